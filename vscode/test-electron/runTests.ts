// The extension in VS Code itself (Electron, under xvfb in the GitHub workflow; these machines cannot download
// VS Code): downloads VS Code, installs the Python Debugger extension from the marketplace, and runs
// suite.ts inside it on the workspace the caller prepared (tests/test_vscode_electron.py).
//   node dist-electron/runTests.js WORKSPACE
import { spawnSync } from "node:child_process";
import * as path from "node:path";

import { downloadAndUnzipVSCode, resolveCliArgsFromVSCodeExecutablePath, runTests } from "@vscode/test-electron";

async function main(): Promise<void> {
  const workspace = process.argv[2];
  if (!workspace) throw new Error("usage: node dist-electron/runTests.js WORKSPACE");
  const extension = path.resolve(__dirname, "..");
  const vscodeExecutablePath = await downloadAndUnzipVSCode("stable");
  const [cli, ...args] = resolveCliArgsFromVSCodeExecutablePath(vscodeExecutablePath);
  const installed = spawnSync(cli, [...args, "--install-extension", "ms-python.debugpy", "--force"], { stdio: "inherit" });
  if (installed.status !== 0) throw new Error("could not install ms-python.debugpy");
  await runTests({
    vscodeExecutablePath,
    extensionDevelopmentPath: extension,
    extensionTestsPath: path.join(extension, "dist-electron", "suite.js"),
    launchArgs: [workspace, "--disable-workspace-trust", "--skip-welcome", "--skip-release-notes"],
  });
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
