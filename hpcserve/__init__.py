"""hpcserve: the `hpcserve` command and the local launcher (the top floor)."""
