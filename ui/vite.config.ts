import react from "@vitejs/plugin-react";
import { defineConfig } from "vitest/config";

// The build lands inside the Python package, so `pip install metaflow-stack` ships it (no Node needed).
export default defineConfig({
  plugins: [react()],
  build: {
    outDir: "../runtime/src/metaflow_stack/ui/static",
    emptyOutDir: true,
    chunkSizeWarningLimit: 1024,
  },
  server: {
    host: "127.0.0.1",
    proxy: { "/api": "http://127.0.0.1:8324" },
  },
  test: { environment: "node" },
});
