"""Flow tests across backends in CI: the pytest plugin, and one report of every backend's JUnit results.

``results`` reads JUnit files (what the plugin recorded travels in each
case's properties), ``report`` makes the test x backend table in Markdown,
``check_runs`` turns the same outcomes into GitHub check-run requests and
posts them. Needs the ``ci`` extra (``pip install 'metaflow-stack[ci]'``).
"""
