"""RQ job functions and worker start-up. See workers.jobs for what a job does."""
