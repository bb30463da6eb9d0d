// A task's cards, rendered in a webview without Metaflow's card server: the HTML comes from the datastore
// through the helper, and is framed sandboxed (pages.ts says why that is safe).
import * as vscode from "vscode";

import type { CardFile, FromCards, ToCards } from "./cardsModel";
import { Refused } from "./helper";
import { openPage } from "./panels";
import { theHelper } from "./runtime";

function problem(error: unknown): string {
  return error instanceof Refused ? error.message : (error as Error).message;
}

/** ``task``'s cards in a panel: listed once its page says it listens (``ready``), each opened as chosen. */
export function showCards(context: vscode.ExtensionContext, task: string): void {
  const panel = openPage(context, "cards", `Cards: ${task}`, vscode.ViewColumn.Active);
  const post = (message: ToCards) => void panel.webview.postMessage(message);
  panel.webview.onDidReceiveMessage(async (message: FromCards) => {
    try {
      if (message.type === "ready") {
        post({ type: "cards", task, cards: await theHelper().request<CardFile[]>("cards", { task }) });
      } else if (message.type === "open") {
        post({ type: "card", file: message.file, html: await theHelper().request<string>("card", { task, file: message.file }) });
      }
    } catch (error) {
      post({ type: "error", message: problem(error) });
    }
  });
}
