# The Metaflow Stack metadata service from its metadata-service image.
#   nomad var put nomad/jobs/metadata-service database_url=postgresql://... [auth_key=...]
#   nomad job run -var image=REGISTRY/metaflow-stack/metadata-service:TAG \
#     -var nats_url=nats://nats.service.consul:4222 metadata-service.nomad.hcl
# Secrets come from Nomad Variables at nomad/jobs/<job>, rendered into the task's
# secrets directory; they are never job variables. Without database_url the
# service runs on SQLite in the allocation (one instance, data lost with it):
# fine for a trial, not for production.

variable "image" {
  type        = string
  description = "The metadata-service image (`metaflow stack images build metadata-service --push`)."
}

variable "name" {
  type    = string
  default = "metadata-service"
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
  description = "More than one needs database_url (PostgreSQL) and nats_url."
}

variable "nats_url" {
  type        = string
  default     = ""
  description = "NATS JetStream for events (nats://host:4222); empty keeps events in each process."
}

variable "log_roots" {
  type        = list(string)
  default     = []
  description = "Datastore roots (s3://bucket/prefix, or folders the client mounts) whose task logs the service may read."
}

variable "heartbeat_cutoff" {
  type    = number
  default = 360
}

variable "cpu" {
  type        = number
  default     = 500
  description = "MHz per instance."
}

variable "memory" {
  type        = number
  default     = 512
  description = "MiB per instance."
}

job "metadata-service" {
  name        = var.name
  type        = "service"
  datacenters = var.datacenters
  namespace   = var.namespace

  group "service" {
    count = var.instances

    network {
      port "http" {
        to = 8080
      }
    }

    service {
      name     = var.name
      port     = "http"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/healthcheck"
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
        image        = var.image
        ports        = ["http"]
        cap_drop     = ["all"]
        security_opt = ["no-new-privileges"]
        readonly_rootfs = true
        mount {
          type   = "tmpfs"
          target = "/tmp"
        }
        mount {
          type   = "tmpfs"
          target = "/var/lib/metaflow-service"
        }
      }

      template {
        destination = "secrets/service.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/${var.name}" }}
        {{- if .database_url }}METAFLOW_STACK_SERVICE_DATABASE={{ .database_url }}{{ end }}
        {{- if .auth_key }}
        METAFLOW_STACK_SERVICE_AUTH_KEY={{ .auth_key }}{{ end }}
        {{- end }}
        EOT
      }

      env {
        METAFLOW_STACK_SERVICE_NATS_URL        = var.nats_url
        METAFLOW_STACK_SERVICE_HEARTBEAT_CUTOFF = var.heartbeat_cutoff
        METAFLOW_STACK_SERVICE_LOG_ROOTS        = join(" ", var.log_roots)
      }

      kill_timeout = "15s"

      resources {
        cpu    = var.cpu
        memory = var.memory
      }
    }
  }
}
