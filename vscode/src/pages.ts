// The webviews' pages: one strict shell per page, its own bundled script, no network. The cards page
// frames a card (the flow's own HTML, with its inline scripts) in a sandboxed iframe: a srcdoc frame takes
// its parent's policy, so that page allows inline scripts, and takes its own script by its source, not by
// nonce (a nonce would disable 'unsafe-inline'). Its parent document holds nothing but this shell; the
// card runs at an opaque origin, away from VS Code's API.
export type PageName = "dag" | "launcher" | "cards";

const TITLES: Record<PageName, string> = { dag: "Metaflow DAG", launcher: "Run a Metaflow flow", cards: "Metaflow cards" };

export function policy(page: PageName, cspSource: string, nonce: string): string {
  const scripts = page === "cards" ? `script-src ${cspSource} 'unsafe-inline'` : `script-src 'nonce-${nonce}'`;
  return [`default-src 'none'`, `style-src 'unsafe-inline' ${cspSource}`, scripts, `img-src ${cspSource} data: blob:`, `font-src data:`].join("; ");
}

export function webviewHtml(page: PageName, scriptUri: string, cspSource: string, nonce: string): string {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${policy(page, cspSource, nonce)}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>${TITLES[page]}</title>
</head>
<body>
<div id="root" class="mf-${page}"><p class="hint">waiting for the extension ...</p></div>
<script nonce="${nonce}" src="${scriptUri}"></script>
</body>
</html>`;
}
