def main(argv=None):
    raise SystemExit("cs336-align: not implemented yet")
