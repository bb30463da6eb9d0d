# The local Nomad cluster of `just nomad-up`: one agent that is both server and client, started as
#   nomad agent -dev -config infra/nomad/dev/agent.hcl
# on 127.0.0.1 with ACLs on. `metaflow stack nomad up` then bootstraps the ACLs, creates the `metaflow`
# namespace and the policy beside this file, and hands out a token that holds only that policy.
# Dev mode keeps its state in memory: a restarted agent is a new, empty cluster.

name      = "metaflow-stack-dev"
bind_addr = "127.0.0.1"

acl {
  enabled = true
}

client {
  enabled = true
}

# The default driver of @nomad: the stack's images from this machine's Docker engine. Nothing
# privileged, and no volumes (dev mode would allow host folders in a job).
plugin "docker" {
  config {
    allow_privileged = false
    volumes {
      enabled = false
    }
  }
}

# @nomad(driver="exec") runs the client's own files in a chroot: Nomad offers that driver only when
# the agent runs as root (it needs cgroups). Dev mode also enables raw_exec (no isolation at all),
# which @nomad uses only when a step asks for driver="raw_exec".
