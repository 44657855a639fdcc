// The record type the ECS check holds every k8s-ebpf record to: Elastic's own `Ecs` (from
// the pinned @elastic/ecs package, never copied here) plus the two objects ECS has no
// field set for, exactly as docs/alerts.md documents them. The test appends one
// `const rN: K8sEbpfRecord = {...};` per record; `tsc --noEmit --strict` then rejects a
// misspelt field (excess property), a wrong type or a missing required one.
import type { Ecs } from '@elastic/ecs';

/** `k8s_ebpf.*`: what ECS has no field for. */
interface K8sEbpfFields {
  count: number;
  summary?: true;
  component: string;
  ports?: number[];
  hook?: 'tracepoint' | 'kretprobe' | 'fexit' | 'reset-tracepoint' | 'sock-diag-scan' | 'sock-diag-rescan' | 'sk-lookup' | 'conntrack-dnat' | 'kubernetes-hostport' | 'kubernetes-externalip' | 'kubernetes-nodeport';
  cgroup_id?: number;
  netns?: number;
  prefix?: string;
  sources?: number;
  sources_at_least?: true;
  client_match?: 'executable' | 'pod' | 'cgroup' | 'container' | 'comm';
  exe_dev?: string;
  exe_inode?: number;
  client_netns?: number;
  listener?: { pid: number; name: string };
  profile?: 'kubeadm' | 'eks' | 'gke' | 'aks' | 'k3s';
  forwarded_to?: string;
  forwarded_by?: {
    via: 'hostPort' | 'externalIPs' | 'NodePort';
    kind: 'Pod' | 'Service';
    namespace: string;
    name: string;
    intercepts?: string;
  };
}

/** `kubernetes.*`, the names Elastic's Kubernetes integrations use. */
interface KubernetesFields {
  identity: 'pod' | 'node' | 'apiserver' | 'pod-range' | 'unknown';
  node?: { name: string; roles?: string[] };
  pod?: { name: string; uid?: string };
  namespace?: string;
  labels?: { [label: string]: string };
  service_account?: { name: string };
  apiserver?: true;
}

type Action =
  | 'unexpected-inbound'
  | 'unexpected-outbound'
  | 'exposed-listener'
  | 'refused-attempt'
  | 'half-open-attempt'
  | 'port-scan'
  | 'allowed-inbound'
  | 'allowed-outbound';

type K8sEbpfRecord = Ecs & {
  event: NonNullable<Ecs['event']> & { kind: 'alert' | 'event'; action: Action; module: 'k8s_ebpf' };
  message: string;
  k8s_ebpf: K8sEbpfFields;
  kubernetes?: KubernetesFields;
};
