# One Metaflow Stack function served over HTTP from its function-fastapi image.
#   nomad var put nomad/jobs/function-NAME auth_key=<a long random string>
#   nomad job run -var image=REGISTRY/metaflow-stack/function-fastapi-NAME:TAG \
#     -var name=function-NAME -var function=NAME function-server.nomad.hcl
# `metaflow function deploy REF --target nomad` fills the variables and validates the job.
# The server listens beyond its container, so it needs an API key, which callers send as
# x-api-key (/health and /ready need none): auth_key in Nomad Variables at nomad/jobs/<name>,
# never a job variable. The job waits until that variable exists and fails if it holds no
# auth_key, unless insecure_no_auth is true. With ACLs on, a task may read only
# nomad/jobs/<its job ID> by default: `deploy` makes the job ID the name; run by hand the
# ID stays function-server, so grant the job that path or pass name=function-server.

variable "image" {
  type        = string
  description = "The image `metaflow function build-image REF --push` printed."
}

variable "name" {
  type        = string
  description = "The job's and its service's name, e.g. function-predict."
}

variable "function" {
  type        = string
  description = "The function's name, recorded in the job's meta."
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
  type    = number
  default = 1
}

variable "cpu" {
  type        = number
  default     = 500
  description = "MHz per instance."
}

variable "memory" {
  type        = number
  default     = 1024
  description = "MiB per instance."
}

variable "max_batch_size" {
  type    = number
  default = 32
}

variable "insecure_no_auth" {
  type        = bool
  default     = false
  description = "Serve without an API key (no Nomad Variables read): anyone who reaches the port may call the function."
}

job "function-server" {
  name        = var.name
  type        = "service"
  datacenters = var.datacenters
  namespace   = var.namespace

  meta {
    metaflow_stack_function = var.function
  }

  group "server" {
    count = var.instances

    network {
      port "http" {
        to = 8000
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

    task "server" {
      driver = "docker"

      config {
        image = var.image
        ports = ["http"]
        # The sandbox the image expects: its own non-root user, no capabilities, no escalation.
        cap_drop     = ["all"]
        security_opt = ["no-new-privileges"]
        readonly_rootfs = true
        mount {
          type   = "tmpfs"
          target = "/tmp"
        }
      }

      # The key goes from Nomad Variables to the task's secrets directory, never through a job variable.
      # `.auth_key.Value`, not `.auth_key`: Nomad reads a missing key as an empty item, which `with` counts as set.
      template {
        destination = "secrets/server.env"
        env         = true
        change_mode = "restart"
        data        = var.insecure_no_auth ? "METAFLOW_STACK_INSECURE_NO_AUTH=1\n" : <<-EOT
        {{- with nomadVar "nomad/jobs/${var.name}" }}
        {{- with .auth_key.Value }}METAFLOW_STACK_SERVE_AUTH_KEY={{ . }}
        {{- else }}{{ sprig_fail "nomad/jobs/${var.name} holds no auth_key: put one there, or run the job with insecure_no_auth=true" }}{{ end }}
        {{- end }}
        EOT
      }

      env {
        METAFLOW_STACK_SERVE_MAX_BATCH_SIZE = var.max_batch_size
      }

      # uvicorn drains in-flight requests on SIGTERM.
      kill_timeout = "35s"

      resources {
        cpu    = var.cpu
        memory = var.memory
      }
    }
  }
}
