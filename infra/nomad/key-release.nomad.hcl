# The key-release service of @confidential steps, from its key-release image.
#   nomad var put nomad/jobs/key-release master_key=$(openssl rand -hex 32) auth_key=<a long random string>
#   nomad job run -var image=REGISTRY/metaflow-stack/key-release:TAG -var-file=policies.vars.hcl key-release.nomad.hcl
# policies.vars.hcl holds the policies enclaves are held to, by name (a step's
# policy="policies/prod.toml" is held to prod):
#   policies = { prod = "[sgx]\nmr_enclave = [\"33d8...fbb\"]\n" }
# The master key (every run's data key derives from it) and the API key come
# from Nomad Variables at nomad/jobs/<job ID>, rendered into the task's secrets
# directory; they are never job variables. Nomad lets a task read the variable of
# its job's ID: `metaflow stack` renders the job with its ID set to `name`; with
# `nomad job run -var name=...` by hand, change the job's label to match. The job waits until that variable
# exists, and fails without master_key. Keep master_key backed up outside Nomad:
# without it no sealed value opens again. The service listens beyond its
# container, so it needs auth_key (launchers send it as
# METAFLOW_STACK_KEY_RELEASE_AUTH_KEY), unless insecure_no_auth is true.

variable "image" {
  type        = string
  description = "The key-release image (`metaflow stack images build key-release --push`)."
}

variable "name" {
  type    = string
  default = "key-release"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "namespace" {
  type    = string
  default = "default"
}

variable "instances" {
  type        = number
  default     = 2
  description = "Keys are derived and nonces checked by their MAC: instances share nothing but the master key."
}

variable "policies" {
  type        = map(string)
  description = "The policies by name (NAME = TOML): each becomes NAME.toml in the service's policy folder."

  validation {
    condition     = alltrue([for name in keys(var.policies) : can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", name))])
    error_message = "A policy's name is letters, digits, '_', '.' and '-' (it becomes a file name)."
  }
}

variable "allow_direct" {
  type        = bool
  default     = false
  description = "Release keys to unattested gramine-direct enclaves too: development clusters only."
}

variable "pccs_url" {
  type        = string
  default     = ""
  description = "The PCCS collateral is fetched from (empty: the runtime's default)."
}

variable "insecure_no_auth" {
  type        = bool
  default     = false
  description = "Serve without an API key when nomad/jobs/<name> holds no auth_key."
}

variable "cpu" {
  type        = number
  default     = 200
  description = "MHz per instance."
}

variable "memory" {
  type        = number
  default     = 256
  description = "MiB per instance."
}

job "key-release" {
  name        = var.name
  type        = "service"
  datacenters = var.datacenters
  namespace   = var.namespace

  group "service" {
    count = var.instances

    network {
      port "http" {
        to = 8325
      }
    }

    service {
      name     = var.name
      port     = "http"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/ready"
        interval = "10s"
        timeout  = "3s"
      }
    }

    update {
      health_check     = "checks"
      min_healthy_time = "10s"
      healthy_deadline = "5m"
      auto_revert      = true
    }

    task "service" {
      driver = "docker"

      config {
        image           = var.image
        ports           = ["http"]
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]
        readonly_rootfs = true
        args = concat(
          ["--policies", "/local/policies", "--master-key-file", "/secrets/master-key"],
          var.allow_direct ? ["--allow-direct"] : [],
        )
        mount {
          type   = "tmpfs"
          target = "/tmp"
        }
      }

      # `.master_key.Value`, not `.master_key`: Nomad reads a missing key as an empty item, which `with` counts
      # as set. No master key fails the template, naming the variable: a service that made one up would seal
      # with a key nobody keeps.
      template {
        destination = "secrets/master-key"
        perms       = "400"
        uid         = 1000 # the image's user: the only one who reads it
        gid         = 1000
        change_mode = "restart"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/${var.name}" }}
        {{- with .master_key.Value }}{{ . }}
        {{- else }}{{ sprig_fail "nomad/jobs/${var.name} holds no master_key: put one there (openssl rand -hex 32)" }}
        {{- end }}
        {{- end }}
        EOT
      }

      template {
        destination = "secrets/service.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/${var.name}" }}
        {{- with .auth_key.Value }}METAFLOW_STACK_KEY_RELEASE_AUTH_KEY={{ . }}
        {{- else }}
        {{- if ${var.insecure_no_auth} }}METAFLOW_STACK_INSECURE_NO_AUTH=1
        {{- else }}{{ sprig_fail "nomad/jobs/${var.name} holds no auth_key: put one there, or run the job with insecure_no_auth=true" }}
        {{- end }}
        {{- end }}
        {{- end }}
        EOT
      }

      # One file per policy, as written: delimiters no TOML policy contains, so nothing in it is a template.
      dynamic "template" {
        for_each = var.policies
        content {
          destination     = "local/policies/${template.key}.toml"
          data            = template.value
          left_delimiter  = "[[%"
          right_delimiter = "%]]"
          change_mode     = "noop"
        }
      }

      env {
        METAFLOW_STACK_PCCS_URL = var.pccs_url
      }

      kill_timeout = "10s"

      resources {
        cpu    = var.cpu
        memory = var.memory
      }
    }
  }
}
