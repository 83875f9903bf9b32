"""dclip's library: pure, testable pieces that know nothing of DVC or params.yaml."""
