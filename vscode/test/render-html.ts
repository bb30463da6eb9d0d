// Prints the webview's page as the extension makes it (for the Chromium test, which serves it):
// node dist-test/render-html.mjs SCRIPT_URI CSP_SOURCE NONCE
import { webviewHtml } from "../src/flowGraph";

const [scriptUri, cspSource, nonce] = process.argv.slice(2);
process.stdout.write(webviewHtml(scriptUri ?? "", cspSource ?? "", nonce ?? ""));
