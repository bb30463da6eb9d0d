"""A worker process: loads one function once, then answers calls over its pipes.

Started by the local backend in the function's own environment as
``python -m metaflow_stack.functions.worker REFERENCE_FILE BASE CODEC PRELOAD``
(``1``: every artifact is loaded before the worker says it is ready).
The protocol owns the original stdout; the function's own prints go to stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(reference_file: str, base: str, codec_name: str, preload: str = "0") -> None:
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the function's prints must not corrupt the protocol
    sys.stdout = sys.stderr
    protocol_in = sys.stdin.buffer

    from metaflow_stack.functions import codecs, loader, protocol, reference

    try:
        ref = reference.parse(Path(reference_file).read_text(encoding="utf-8"))
        fn, params = loader.load(ref, base or None, preload=preload == "1")
        requests = codecs.create(codec_name, ref.input_schema)
        responses = codecs.create(codec_name, ref.output_schema)
    except BaseException as exc:
        protocol.write_frame(protocol_out, protocol.LOAD_FAILED, protocol.error_payload(exc))
        return
    protocol.write_frame(protocol_out, protocol.READY, b"")

    while True:
        try:
            kind, payload = protocol.read_frame(protocol_in)
        except protocol.ChannelClosed:
            return
        try:
            if kind == protocol.BATCH:
                result = responses.encode_batch([fn(value, params) for value in requests.decode_batch(payload)])
            else:
                result = responses.encode(fn(requests.decode(payload), params))
        except Exception as exc:
            protocol.write_frame(protocol_out, protocol.RAISED, protocol.error_payload(exc))
            continue
        protocol.write_frame(protocol_out, protocol.OK, result)


if __name__ == "__main__":
    main(*sys.argv[1:5])
