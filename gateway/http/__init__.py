"""The gateway's HTTP edge: credentials and body limits before a body is read (:mod:`.edge`,
:mod:`.auth`), connection hygiene per listener (:mod:`.connections`), probes and metrics
(:mod:`.observability`)."""
