// The card preview's messages: the task's cards listed, then one card's HTML to frame.
export interface CardFile {
  file: string;
  type: string;
  id: string | null;
  hash: string;
}

export type ToCards =
  | { type: "cards"; task: string; cards: CardFile[] }
  | { type: "card"; file: string; html: string }
  | { type: "error"; message: string };
/** ``ready``: the page listens (the list is posted then); ``open``: a card chosen. */
export type FromCards = { type: "ready" } | { type: "open"; file: string };

/** How a card is named in the picker: its type and id (Metaflow's default card has no id). */
export function cardLabel(card: CardFile): string {
  return card.id ? `${card.type} · ${card.id}` : card.type;
}
