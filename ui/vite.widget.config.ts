import { defineConfig } from "vite";

// The notebook's DAG widget: one ES module (anywidget loads it as is) inside the Python package, beside its
// kernel side (metaflow_stack/notebook/widget.py).
export default defineConfig({
  build: {
    lib: { entry: "src/widget/main.ts", formats: ["es"], fileName: () => "dag_widget.js" },
    outDir: "../runtime/src/metaflow_stack/notebook/static",
    emptyOutDir: true,
    minify: true,
  },
});
