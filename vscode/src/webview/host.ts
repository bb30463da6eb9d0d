// What a webview page has of VS Code: `acquireVsCodeApi()`, callable once per page, to post to the extension.
interface VsCodeApi<T> {
  postMessage(message: T): void;
}
declare function acquireVsCodeApi<T>(): VsCodeApi<T>;

export function extensionHost<T>(): VsCodeApi<T> {
  return acquireVsCodeApi<T>();
}
