{{/* Names, labels and the env/volume wiring every workload of the chart shares. */}}
{{- define "flywheel.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "flywheel.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flywheel.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flywheel.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* env of a component: the shared config map, its Kafka principal, MLflow credentials, object store. */}}
{{- define "flywheel.envFrom" -}}
- configMapRef:
    name: {{ include "flywheel.fullname" . }}-config
{{- with .Values.lake.objectStoreSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{- define "flywheel.env" -}}
{{- $principal := index .root.Values.kafka.credentials .principal -}}
{{- if hasPrefix "SASL" .root.Values.kafka.securityProtocol }}
- name: FLYWHEEL_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ $principal }}, key: username}
- name: FLYWHEEL_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $principal }}, key: password}
{{- end }}
{{- with .root.Values.mlflow.credentialsSecret }}
- name: FLYWHEEL_MLFLOW_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: username}
- name: FLYWHEEL_MLFLOW_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: password}
{{- end }}
{{- end -}}

{{- define "flywheel.caVolumeMount" -}}
{{- if .Values.kafka.caSecret }}
- name: kafka-ca
  mountPath: /etc/flywheel/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "flywheel.caVolume" -}}
{{- with .Values.kafka.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{- define "flywheel.securityContext" -}}
runAsNonRoot: true
runAsUser: 10001
fsGroup: 10001
{{- end -}}
