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

# The default driver of @nomad: the stack's images from this machine's Docker engine, nothing
# privileged, no host folders (Nomad's defaults, written down). Images stay: Nomad's docker driver
# removes an image once no task uses it, and with no registry configured the stack's base image
# is on this machine only, so the next step would find it gone.
plugin "docker" {
  config {
    allow_privileged = false
    volumes {
      enabled = false
    }
    gc {
      image = false
    }
  }
}

# Dev mode enables raw_exec, which runs a job's command as the agent's own user with no isolation:
# any token that may submit jobs could then run anything here. Off; set `enabled = true` to try
# @nomad(driver="raw_exec"). @nomad(driver="exec") runs the client's own files in a chroot: Nomad
# offers that driver only when the agent runs as root (it needs cgroups).
plugin "raw_exec" {
  config {
    enabled = false
  }
}
