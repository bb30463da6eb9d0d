// A webview panel for one of the extension's pages: its bundled script, its strict page (pages.ts), scripts
// on, resources only from the extension's dist folder.
import { randomBytes } from "node:crypto";
import * as vscode from "vscode";

import { type PageName, webviewHtml } from "./pages";

export function openPage(context: vscode.ExtensionContext, page: PageName, title: string, column: vscode.ViewColumn): vscode.WebviewPanel {
  const panel = vscode.window.createWebviewPanel(`metaflowStack.${page}`, title, { viewColumn: column, preserveFocus: true }, {
    enableScripts: true,
    retainContextWhenHidden: page !== "dag",
    localResourceRoots: [vscode.Uri.joinPath(context.extensionUri, "dist")],
  });
  const script = panel.webview.asWebviewUri(vscode.Uri.joinPath(context.extensionUri, "dist", `${page}.js`));
  panel.webview.html = webviewHtml(page, script.toString(), panel.webview.cspSource, randomBytes(16).toString("base64"));
  return panel;
}
