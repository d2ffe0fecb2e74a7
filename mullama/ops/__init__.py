"""Operations: what running Mullama as a service needs beyond answering requests.

:mod:`.metrics` (Prometheus families over :mod:`.prometheus`, with
:mod:`.process`), :mod:`.stats` (hourly usage in SQLite, percentiles from
:mod:`.latency`), :mod:`.keys` (scoped API keys, rates from
:mod:`.ratelimit`), :mod:`.limits` (per-model limits), :mod:`.systemd`
(readiness), :mod:`.logs` (JSON logs, request ids), :mod:`.durations`
(``30d``, ``24h``); :mod:`.operations` puts them together for the daemon.
"""
