"""What the VS Code extension asks of the runtime: a flow's graph from its source (``graph``), over a JSON
command line (``metaflow ide graph FILE --json``) or one long-lived helper process (``metaflow ide serve``)."""
