# What a @nomad run needs in its namespace, and nothing more: register its jobs and purge them
# (submit-job), watch their evaluations and allocations (read-job), find the jobs a killed run
# left behind (list-jobs), and stream the tasks' output (read-logs). `metaflow stack nomad up`
# and the Pulumi component (infra/pulumi/components/nomad_stack.py) apply this file as the policy
# `metaflow`; tokens for flows hold only it.
namespace "metaflow" {
  capabilities = ["submit-job", "read-job", "list-jobs", "read-logs"]
}
