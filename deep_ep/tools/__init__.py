"""Tools around the library: rank launching (launch), the environment and coherence check (check), the
benchmark entry point (bench), the plots of benchmark records (plot, used by `python -m deep_ep.bench plot`)
and the demo (demo); `python -m deep_ep.<tool>` runs check, bench and demo."""
