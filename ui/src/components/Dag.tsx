// The run's DAG as SVG: steps placed by dagre, coloured by status, foreach items as a grid of cells.
import { useMemo } from "react";
import { Link } from "react-router-dom";

import type { Graph, TaskInfo } from "../api";
import { ITEM_CELL, ITEMS_PER_ROW, layout, MAX_ITEM_CELLS, stepStates } from "../dag";

function path(points: { x: number; y: number }[]): string {
  return points.map((p, i) => `${i === 0 ? "M" : "L"}${p.x},${p.y}`).join(" ");
}

function itemLabel(task: TaskInfo): string {
  return `${task.foreach.join(" / ")} · ${task.status} · ${task.pathspec}`;
}

export function Dag({
  graph,
  tasks,
  onSelect,
  roles,
}: {
  graph: Graph;
  tasks: TaskInfo[];
  onSelect: (task: TaskInfo) => void;
  /** An artifact's lineage: each step's role (produced, carried, absent), drawn as its outline. */
  roles?: Record<string, string>;
}) {
  const placed = useMemo(() => layout(graph, stepStates(graph, tasks)), [graph, tasks]);
  return (
    <svg
      className="dag"
      width={placed.width}
      height={placed.height}
      viewBox={`0 0 ${placed.width} ${placed.height}`}
      role="img"
      aria-label="run graph"
    >
      <defs>
        <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
          <path d="M 0 0 L 10 5 L 0 10 z" className="arrow-head" />
        </marker>
      </defs>
      {placed.edges.map((edge) => (
        <path
          key={`${edge.from}->${edge.to}`}
          className={edge.foreach ? "edge edge-foreach" : "edge"}
          data-edge={`${edge.from}->${edge.to}`}
          d={path(edge.points)}
          markerEnd="url(#arrow)"
        />
      ))}
      {placed.nodes.map((node) => {
        const shown = node.tasks.slice(0, MAX_ITEM_CELLS);
        const single = !node.inForeach && node.tasks.length === 1 ? node.tasks[0] : null;
        return (
          <g
            key={node.name}
            className={`step status-${node.status}${roles ? ` role-${roles[node.name] ?? "absent"}` : ""}`}
            data-step={node.name}
            data-status={node.status}
            data-role={roles ? (roles[node.name] ?? "absent") : undefined}
            transform={`translate(${node.x},${node.y})`}
          >
            <rect className="step-box" width={node.width} height={node.height} rx={8} />
            <text className="step-name" x={12} y={22}>
              {single ? <Link to={`/${single.pathspec}`}>{node.name}</Link> : node.name}
            </text>
            <text className="step-meta" x={12} y={42}>
              {node.type.replace("split-", "")}
              {node.tasks.length > 0 && ` · ${node.counts.completed}/${node.tasks.length} done`}
              {node.counts.failed > 0 && ` · ${node.counts.failed} failed`}
              {node.counts.running > 0 && ` · ${node.counts.running} running`}
            </text>
            {node.inForeach && (
              <g className="items" transform="translate(12,54)" data-items={node.tasks.length}>
                {shown.map((task, i) => (
                  <rect
                    key={task.pathspec}
                    className={`item status-${task.status}`}
                    data-item={task.foreach.join("/")}
                    x={(i % ITEMS_PER_ROW) * (ITEM_CELL + 1.5)}
                    y={Math.floor(i / ITEMS_PER_ROW) * (ITEM_CELL + 2)}
                    width={ITEM_CELL}
                    height={ITEM_CELL}
                    onClick={() => onSelect(task)}
                  >
                    <title>{itemLabel(task)}</title>
                  </rect>
                ))}
              </g>
            )}
            {node.tasks.length > MAX_ITEM_CELLS && (
              <text className="step-meta" x={node.width - 12} y={42} textAnchor="end">
                +{node.tasks.length - MAX_ITEM_CELLS}
              </text>
            )}
          </g>
        );
      })}
    </svg>
  );
}
