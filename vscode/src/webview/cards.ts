// The card preview: the task's cards in a picker, the chosen one framed sandboxed (its own scripts run at an
// opaque origin: no VS Code API, no storage, no network, as the page's policy, which the frame inherits,
// allows none).
import { element } from "../../../ui/src/dagSvg";
import { cardLabel, type FromCards, type ToCards } from "../cardsModel";
import { extensionHost } from "./host";

const vscode = extensionHost<FromCards>();
const root = document.getElementById("root") as HTMLElement;
document.head.append(
  element(
    "style",
    `body { color: var(--vscode-foreground); background: var(--vscode-editor-background); margin: 0; }
.bar { padding: 6px 10px; } .error { color: var(--vscode-errorForeground, #d64545); padding: 6px 10px; }
iframe { width: 100%; height: calc(100vh - 48px); border: none; background: white; }`,
  ),
);

const bar = element("div", undefined, "bar");
const picker = element("select");
picker.id = "card";
const problem = element("p", undefined, "error");
const frame = element("iframe");
frame.setAttribute("sandbox", "allow-scripts");
frame.title = "card";
bar.append(picker);
root.replaceChildren(bar, problem, frame);
picker.addEventListener("change", () => vscode.postMessage({ type: "open", file: picker.value }));

window.addEventListener("message", (event: MessageEvent<ToCards>) => {
  if (event.source === frame.contentWindow) return; // the card itself: it speaks for no one
  const message = event.data;
  if (message.type === "cards") {
    picker.replaceChildren(
      ...message.cards.map((card) => {
        const option = element("option", cardLabel(card));
        option.value = card.file;
        return option;
      }),
    );
    problem.textContent = message.cards.length === 0 ? `${message.task} has no cards (add @card to its step)` : "";
    if (message.cards.length > 0) vscode.postMessage({ type: "open", file: message.cards[0].file });
  } else if (message.type === "card") {
    frame.dataset.file = message.file;
    frame.srcdoc = message.html;
  } else {
    problem.textContent = message.message;
  }
});

vscode.postMessage({ type: "ready" }); // now listening: the extension posts the task's cards
