// The runtime the extension speaks to: the Python with metaflow-stack (from the settings, else the Python
// extension's), the environment every process it starts gets (service URL, datastore root, profile from
// the settings), and the one helper process, started again when a setting changes.
import * as vscode from "vscode";

import { Helper } from "./helper";

let helper: Helper | undefined;

/** What the Python extension exports (its documented API): the interpreter chosen for the workspace. */
interface PythonExtensionApi {
  environments?: { getActiveEnvironmentPath(resource?: vscode.Uri): { path: string } };
}

export function python(): string {
  const configured = vscode.workspace.getConfiguration("metaflowStack").get<string>("python");
  if (configured) return configured;
  const extension = vscode.extensions.getExtension<PythonExtensionApi>("ms-python.python");
  const chosen = extension?.isActive ? extension.exports?.environments?.getActiveEnvironmentPath(vscode.workspace.workspaceFolders?.[0]?.uri).path : undefined;
  if (chosen) return chosen;
  const fromSettings = vscode.workspace.getConfiguration("python").get<string>("defaultInterpreterPath");
  return fromSettings && fromSettings !== "python" ? fromSettings : "python3";
}

/** Where the workspace's flows run from (relative paths and the local datastore resolve here). */
export function workspaceFolder(): string | undefined {
  return vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
}

/** The settings as Metaflow's own environment variables (unset settings leave Metaflow's configuration). */
export function metaflowEnv(): Record<string, string> {
  const settings = vscode.workspace.getConfiguration("metaflowStack");
  const env: Record<string, string> = {};
  const serviceUrl = settings.get<string>("serviceUrl");
  const datastoreRoot = settings.get<string>("datastoreRoot");
  const profile = settings.get<string>("profile");
  if (serviceUrl) Object.assign(env, { METAFLOW_SERVICE_URL: serviceUrl, METAFLOW_DEFAULT_METADATA: "service" });
  if (datastoreRoot) env.METAFLOW_DATASTORE_SYSROOT_LOCAL = datastoreRoot;
  if (profile) env.METAFLOW_PROFILE = profile;
  return env;
}

export function theHelper(): Helper {
  helper ??= new Helper(python(), workspaceFolder(), metaflowEnv());
  return helper;
}

/** Start the helper again with the settings as they are now. */
export function restartHelper(): void {
  helper?.dispose();
  helper = undefined;
}

export const SETTINGS = ["metaflowStack.python", "metaflowStack.serviceUrl", "metaflowStack.datastoreRoot", "metaflowStack.profile"];
