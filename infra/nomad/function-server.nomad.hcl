# One Metaflow Stack function served over HTTP from its function-fastapi image.
#   nomad job run -var image=REGISTRY/metaflow-stack/function-fastapi-NAME:TAG \
#     -var name=function-NAME -var function=NAME function-server.nomad.hcl
# `metaflow function deploy REF --target nomad` fills the variables and validates the job.

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
