// The runs sidebar: Flow > Run > Step > Task > Artifact from the helper's bounded listings (the service, or
// the local datastore; nothing unpickled to list), pages of 100 with "Load more...", filters (status, tags,
// mine), refreshed when Metaflow records a run here and while a shown run runs.
import * as vscode from "vscode";

import { Refused } from "./helper";
import {
  type ArtifactList,
  describeFilters,
  type Filters,
  type FlowList,
  NO_FILTERS,
  type Node,
  ordered,
  pathspecOf,
  runQuery,
  type RunList,
  type RunSummary,
  shown,
  type TaskList,
} from "./runsModel";
import { theHelper } from "./runtime";

/** Seconds between refreshes while a run shown in the tree is running. */
const LIVE_REFRESH_MS = 3000;

export class RunsTree implements vscode.TreeDataProvider<Node> {
  private readonly changed = new vscode.EventEmitter<Node | undefined>();
  readonly onDidChangeTreeData = this.changed.event;
  filters: Filters = NO_FILTERS;
  private user: string | null = null;
  /** Nodes listed under each parent after "Load more...", by parent (null: the root). */
  private readonly extra = new Map<Node | null, Node[]>();
  private readonly loading = new Set<string>();
  private live: ReturnType<typeof setTimeout> | undefined;
  view: vscode.TreeView<Node> | undefined;

  refresh(): void {
    this.extra.clear();
    this.changed.fire(undefined);
  }

  /** Forget who "mine" is (the settings or the connection changed) and list again. */
  reset(): void {
    this.user = null;
    this.refresh();
  }

  setFilters(filters: Filters): void {
    this.filters = filters;
    if (this.view) this.view.description = describeFilters(filters);
    this.refresh();
  }

  getTreeItem(node: Node): vscode.TreeItem {
    const look = shown(node);
    const item = new vscode.TreeItem(look.label, look.expandable ? vscode.TreeItemCollapsibleState.Collapsed : vscode.TreeItemCollapsibleState.None);
    item.description = look.description;
    item.tooltip = look.tooltip;
    item.iconPath = new vscode.ThemeIcon(look.icon);
    item.contextValue = look.context;
    if (node.kind === "artifact") item.command = { command: "metaflowStack.previewArtifact", title: "Preview", arguments: [node] };
    if (node.kind === "more") item.command = { command: "metaflowStack.loadMore", title: "Load more", arguments: [node] };
    return item;
  }

  async getChildren(node?: Node): Promise<Node[]> {
    const parent = node ?? null;
    try {
      const first = await this.list(parent, null);
      const extra = this.extra.get(parent);
      if (!extra) return first;
      // Pages loaded before, after the first page as it is now (a new run shifts them: none shown twice).
      const shownFirst = new Set(first.map(pathspecOf).filter((key) => key !== null));
      const unseen = (node: Node) => {
        const key = pathspecOf(node);
        return key === null || !shownFirst.has(key);
      };
      return [...first.filter((child) => child.kind !== "more"), ...extra.filter(unseen)];
    } catch (error) {
      return [{ kind: "message", text: error instanceof Refused ? error.message : (error as Error).message }];
    }
  }

  /** The next page under ``more``'s parent, appended where "Load more..." was. */
  async loadMore(more: Extract<Node, { kind: "more" }>): Promise<void> {
    if (this.loading.has(more.cursor)) return; // a second click on the same "Load more..."
    this.loading.add(more.cursor);
    try {
      const page = await this.list(more.parent, more.cursor);
      const kept = (this.extra.get(more.parent) ?? []).filter((node) => node.kind !== "more");
      this.extra.set(more.parent, [...kept, ...page]);
      this.changed.fire(more.parent ?? undefined);
    } catch (error) {
      void vscode.window.showErrorMessage(error instanceof Refused ? error.message : (error as Error).message);
    } finally {
      this.loading.delete(more.cursor);
    }
  }

  private async list(node: Node | null, cursor: string | null): Promise<Node[]> {
    const helper = theHelper();
    const more = (next: string | null): Node[] => (next ? [{ kind: "more", parent: node, cursor: next }] : []);
    if (node === null) {
      const page = await helper.request<FlowList>("flows", { limit: 100, cursor });
      if (page.flows.length === 0 && cursor === null) return [{ kind: "message", text: "No runs here yet: run a flow (Metaflow: Run Flow...)" }];
      return [...page.flows.map((flow): Node => ({ kind: "flow", flow: flow.name })), ...more(page.next_cursor)];
    }
    switch (node.kind) {
      case "flow": {
        if (this.filters.mine && this.user === null) this.user = (await helper.request<{ user: string }>("profile", {})).user;
        const page = await helper.request<RunList>("runs", runQuery(node.flow, this.filters, this.user, cursor));
        if (page.runs.some((run) => run.status === "running")) this.followLive();
        return [...page.runs.map((run): Node => ({ kind: "run", run })), ...more(page.next_cursor)];
      }
      case "run": {
        const summary = await helper.request<RunSummary>("summary", { run: node.run.pathspec });
        return summary.steps.map((step): Node => ({ kind: "step", run: node.run.pathspec, step }));
      }
      case "step": {
        const page = await helper.request<TaskList>("tasks", { run: node.run, step: node.step.step_name, limit: 100, cursor });
        return [...page.tasks.map((task): Node => ({ kind: "task", task })), ...more(page.next_cursor)];
      }
      case "task": {
        const page = await helper.request<ArtifactList>("artifacts", { task: node.task.pathspec, limit: 200, cursor });
        return [...ordered(page.artifacts).map((artifact): Node => ({ kind: "artifact", artifact })), ...more(page.next_cursor)];
      }
      default:
        return [];
    }
  }

  private followLive(): void {
    if (this.live) return;
    this.live = setTimeout(() => {
      this.live = undefined;
      this.changed.fire(undefined); // listings again, keeping the pages loaded
    }, LIVE_REFRESH_MS);
  }

  dispose(): void {
    if (this.live) clearTimeout(this.live);
    this.changed.dispose();
  }
}
