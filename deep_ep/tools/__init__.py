"""Tools around the library: rank launching (launch), the environment and coherence check (check), the
benchmark entry point (bench) and the demo (demo); `python -m deep_ep.<tool>` runs each."""
