// Bundles the extension (Node, CommonJS, `vscode` external) and each webview page's script (browser, one file);
// `--tests` bundles test/*.test.ts for node's own test runner; `--electron` the VS Code (Electron) suite. The DAG's layout is the UI's (ui/src/dag.ts),
// its dagre resolved from this package.
import { build } from "esbuild";
import { readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
const shared = { bundle: true, sourcemap: false, logLevel: "warning", nodePaths: [`${here}node_modules`] };

if (process.argv.includes("--electron")) {
  await build({ ...shared, entryPoints: [`${here}test-electron/runTests.ts`], outfile: `${here}dist-electron/runTests.js`, platform: "node", format: "cjs" });
  await build({ ...shared, entryPoints: [`${here}test-electron/suite.ts`], outfile: `${here}dist-electron/suite.js`, platform: "node", format: "cjs", external: ["vscode"] });
} else if (process.argv.includes("--tests")) {
  const tests = readdirSync(`${here}test`).filter((name) => name.endsWith(".ts"));
  await build({
    ...shared,
    entryPoints: tests.map((name) => `${here}test/${name}`),
    outdir: `${here}dist-test`,
    platform: "node",
    format: "esm",
    outExtension: { ".js": ".mjs" },
  });
} else {
  await build({
    ...shared,
    entryPoints: [`${here}src/extension.ts`],
    outfile: `${here}dist/extension.js`,
    platform: "node",
    format: "cjs",
    external: ["vscode"],
    minify: true,
  });
  for (const page of ["dag", "launcher", "cards"]) {
    await build({
      ...shared,
      entryPoints: [`${here}src/webview/${page}.ts`],
      outfile: `${here}dist/${page}.js`,
      platform: "browser",
      format: "iife",
      minify: true,
    });
  }
}
