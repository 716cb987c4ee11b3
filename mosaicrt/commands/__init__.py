"""The `mosaicrt` commands: one module each, with `add_cli_args(parser)` and `main(args) -> int`.

A command parses nothing itself and holds no logic beyond calling the library and printing what
it returns; mosaicrt.cli assembles them into the command line.
"""
