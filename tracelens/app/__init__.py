"""Programs over experiments and models: the model server (``server``) and the dashboard (``dashboard``), with
the loopback / token rules and the serve loop they share (``local_http``)."""
