"""The workers: RQ job functions (workers.jobs: process_batch, deliver; workers.retention:
the daily run) and what runs them: the worker class (worker), its watchdog thread
(watchdog), the scheduler (scheduler), the worker processes (processes), what a job sees
(runtime). See docs/architecture.md."""
