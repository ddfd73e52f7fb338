"""The demo: the bundled demo VLA's demonstrations (`expert`, `language`, `data`), its training (`train`), and
the whole method run on it from discovery to the report (`run`, `vla-steer demo`)."""
