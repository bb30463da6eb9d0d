# What Metaflow needs in its namespace, and nothing more: register a @nomad run's jobs and a
# deployed flow's, and purge them (submit-job), watch their evaluations and allocations (read-job),
# find the jobs a killed run left behind (list-jobs), stream the tasks' output (read-logs), and run
# a deployed flow (`nomad trigger`: dispatch-job); write the run's credentials (a deployed flow's, a
# @nomad task's, a worker pool's) to its job's own variable (`nomad/jobs/<job>`, which only that job reads). `metaflow stack nomad up`
# and the Pulumi component (infra/pulumi/components/nomad_stack.py) apply this file as the policy
# `metaflow`; tokens for flows hold only it. Reading the nodes (their resources) lets a run fail a
# job that asks for more than any node has at once, instead of leaving it queued forever.
namespace "metaflow" {
  capabilities = ["submit-job", "read-job", "list-jobs", "read-logs", "dispatch-job"]
  variables {
    path "nomad/jobs/*" {
      capabilities = ["write", "destroy"]
    }
  }
}

node {
  policy = "read"
}
