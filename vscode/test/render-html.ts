// Prints a webview page as the extension makes it (for the Chromium tests, which serve it):
// node dist-test/render-html.mjs PAGE SCRIPT_URI CSP_SOURCE NONCE
import { type PageName, webviewHtml } from "../src/pages";

const [page, scriptUri, cspSource, nonce] = process.argv.slice(2);
process.stdout.write(webviewHtml((page ?? "dag") as PageName, scriptUri ?? "", cspSource ?? "", nonce ?? ""));
