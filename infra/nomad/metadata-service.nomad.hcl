# The Metaflow Stack metadata service from its metadata-service image.
#   nomad var put nomad/jobs/metadata-service auth_key=<a long random string> database_url=postgresql://...
#   nomad job run -var image=REGISTRY/metaflow-stack/metadata-service:TAG \
#     -var nats_url=nats://nats.service.consul:4222 metadata-service.nomad.hcl
# Secrets come from Nomad Variables at nomad/jobs/<job>, rendered into the task's
# secrets directory; they are never job variables. The job waits until that
# variable exists. Without database_url the service runs on SQLite in the
# allocation (one instance, data lost with it): fine for a trial, not for
# production. The service listens beyond its container, so it needs auth_key,
# which clients send as x-api-key (METAFLOW_SERVICE_AUTH_KEY): without one the
# job fails, unless insecure_no_auth is true.

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

variable "insecure_no_auth" {
  type        = bool
  default     = false
  description = "Serve without an API key when nomad/jobs/<name> holds no auth_key: anyone who reaches the port may read and write."
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

      # `.database_url.Value`, not `.database_url`: Nomad reads a missing key as an empty item, which `with`
      # counts as set. The opt-out is written only where no key is: a key, when there is one, is enforced.
      template {
        destination = "secrets/service.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/${var.name}" }}
        {{- with .database_url.Value }}METAFLOW_STACK_SERVICE_DATABASE={{ . }}
        {{ end }}
        {{- with .auth_key.Value }}METAFLOW_STACK_SERVICE_AUTH_KEY={{ . }}
        {{- else }}
        {{- if ${var.insecure_no_auth} }}METAFLOW_STACK_INSECURE_NO_AUTH=1
        {{- else }}{{ sprig_fail "nomad/jobs/${var.name} holds no auth_key: put one there, or run the job with insecure_no_auth=true" }}
        {{- end }}
        {{- end }}
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
