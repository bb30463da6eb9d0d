// The status bar item: where runs are read from (the metadata service or a local datastore) and the
// Metaflow profile; clicking it reconnects (after the service came up, say).
import * as vscode from "vscode";

import { Refused } from "./helper";
import { theHelper } from "./runtime";

interface Profile {
  metadata: "local" | "service";
  where: string;
  profile: string | null;
  user: string;
  datastore: string | null;
}

export function statusItem(): vscode.StatusBarItem {
  const item = vscode.window.createStatusBarItem("metaflowStack.where", vscode.StatusBarAlignment.Left, 10);
  item.name = "Metaflow";
  item.command = "metaflowStack.reconnect";
  return item;
}

export async function describeWhere(item: vscode.StatusBarItem): Promise<void> {
  try {
    const found = await theHelper().request<Profile>("profile", {});
    item.text = `$(database) Metaflow: ${found.metadata}${found.profile ? ` (${found.profile})` : ""}`;
    item.tooltip = `Runs from ${found.where}\nValues from ${found.datastore ?? "(no datastore)"}\nYou are ${found.user}\nClick to reconnect`;
  } catch (error) {
    item.text = "$(warning) Metaflow: not connected";
    item.tooltip = error instanceof Refused ? error.message : (error as Error).message;
  }
  item.show();
}
