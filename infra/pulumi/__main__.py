"""`pulumi up` in this folder: the stack program (``stack_program``), as `metaflow stack cluster up` runs it."""

from stack_program import main

main()
