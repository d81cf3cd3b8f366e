//! The address policy for fetching image URLs: deny-by-default for every
//! address that is not ordinary public unicast, unless an operator allowed
//! its network (`images.allowed_networks`). Cloud metadata and host-agent
//! endpoints are refused always, allowed network or not, by address (in
//! every notation that embeds one) and by their well-known names.
//!
//! Pure functions over addresses, names and URLs, with no I/O, so the whole
//! table is tested without touching the network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is refused. The `label` is also the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    /// A cloud provider's metadata or host-agent endpoint. The one reason
    /// `images.allowed_networks` cannot lift.
    Metadata,
    /// A Kubernetes service address outside private space (GKE's default
    /// service range), or the API server's in-cluster name.
    ClusterService,
    SharedCgnat,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
    /// IPv6 space with no public unicast use (deprecated or unassigned).
    NotGlobalUnicast,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::Loopback => "loopback",
            Reason::Private => "private",
            Reason::LinkLocal => "link_local",
            Reason::Metadata => "metadata",
            Reason::ClusterService => "cluster_service",
            Reason::SharedCgnat => "cgnat",
            Reason::Multicast => "multicast",
            Reason::Broadcast => "broadcast",
            Reason::Documentation => "documentation",
            Reason::Benchmarking => "benchmarking",
            Reason::Reserved => "reserved",
            Reason::NotGlobalUnicast => "not_global_unicast",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Reason::Unspecified => "an unspecified address",
            Reason::Loopback => "a loopback address",
            Reason::Private => "a private network address",
            Reason::LinkLocal => "a link-local address",
            Reason::Metadata => "a cloud metadata or host-agent endpoint",
            Reason::ClusterService => "a Kubernetes cluster service",
            Reason::SharedCgnat => "a shared (CGNAT) address",
            Reason::Multicast => "a multicast address",
            Reason::Broadcast => "a broadcast address",
            Reason::Documentation => "a documentation address",
            Reason::Benchmarking => "a benchmarking address",
            Reason::Reserved => "a reserved address",
            Reason::NotGlobalUnicast => "not a public unicast address",
        }
    }
}

/// A refused address, with the address as it was written and, when an IPv6
/// form embeds an IPv4 address that decided, that IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub addr: IpAddr,
    pub reason: Reason,
    /// The IPv4 address inside `addr` (mapped, NAT64, 6to4, Teredo, …) that
    /// the verdict is about.
    pub embedded: Option<Ipv4Addr>,
    /// What lives there, when the tables name it ("Azure WireServer").
    pub service: Option<&'static str>,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            Some(v4) => write!(f, "{} embeds {v4}, {}", self.addr, self.reason.describe())?,
            None => write!(f, "{} is {}", self.addr, self.reason.describe())?,
        }
        match self.service {
            Some(service) => write!(f, " ({service})"),
            None => Ok(()),
        }
    }
}

/// A host refused by its name before any lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedName {
    /// The name as compared: lower case, no trailing dot.
    pub name: String,
    pub reason: Reason,
    pub service: &'static str,
}

impl fmt::Display for RefusedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the host {} is the name of {}, refused by name",
            self.name, self.service
        )
    }
}

/// Which addresses may be fetched.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    /// `allowed_networks` entries are CIDRs or single addresses (validated by config).
    pub fn new<S: AsRef<str>>(allowed_networks: &[S]) -> Result<Self, String> {
        let allowed = allowed_networks
            .iter()
            .map(|n| {
                let n = n.as_ref();
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("images.allowed_networks: {n:?} is not a CIDR"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed })
    }

    /// Allows `networks` (already parsed by the config) through the block.
    pub fn from_networks(networks: Vec<IpNet>) -> Self {
        Self { allowed: networks }
    }

    /// Whether Iris may connect to `addr`.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refused> {
        let verdict = judge(addr);
        // Metadata and host-agent endpoints stay refused whatever the
        // operator allowed: a network opened for its own image servers
        // (100.64.0.0/10, 169.254.0.0/16, 2002::/16, even ::/0) must not
        // open the host's credentials too.
        if let Some(refused) = verdict.as_ref().filter(|r| r.reason == Reason::Metadata) {
            return Err(refused.clone());
        }
        // An IPv4-mapped address is the IPv4 address itself to the kernel,
        // so an allowed IPv4 network covers its mapped form too.
        let as_v4 = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if self
            .allowed
            .iter()
            .any(|net| net.contains(&addr) || as_v4.is_some_and(|v4| net.contains(&v4)))
        {
            return Ok(());
        }
        verdict.map_or(Ok(()), Err)
    }
}

/// The reason `addr` is not ordinary public unicast, or `None` if it is.
pub fn classify(addr: IpAddr) -> Option<Reason> {
    judge(addr).map(|refused| refused.reason)
}

/// Why `addr` is refused when no network is allowed, or `None` if it is
/// ordinary public unicast.
pub fn judge(addr: IpAddr) -> Option<Refused> {
    match addr {
        IpAddr::V4(v4) => judge_v4(v4).map(|range| Refused {
            addr,
            reason: range.reason,
            embedded: None,
            service: range.service,
        }),
        IpAddr::V6(v6) => judge_v6(v6),
    }
}

// --- the tables ---------------------------------------------------------------
//
// One table per family; the longest matching prefix decides, so a metadata
// address inside a link-local or CGNAT range is reported (and refused
// without exception) as metadata, whatever the order of the rows.
//
// Sources are the providers' own pages, named by title and address as they
// were known when this was written; where an entry rests on something else
// (a widely shared SSRF list, an observed resolution), the comment says so.

#[derive(Debug, Clone, Copy)]
struct Range4 {
    net: Ipv4Addr,
    prefix: u32,
    reason: Reason,
    service: Option<&'static str>,
}

const fn r4(net: [u8; 4], prefix: u32, reason: Reason) -> Range4 {
    Range4 {
        net: Ipv4Addr::new(net[0], net[1], net[2], net[3]),
        prefix,
        reason,
        service: None,
    }
}

const fn named4(net: [u8; 4], prefix: u32, reason: Reason, service: &'static str) -> Range4 {
    Range4 {
        service: Some(service),
        ..r4(net, prefix, reason)
    }
}

const fn metadata4(net: [u8; 4], prefix: u32, service: &'static str) -> Range4 {
    named4(net, prefix, Reason::Metadata, service)
}

/// Every IPv4 address that is not ordinary public unicast.
const V4: &[Range4] = &[
    // --- cloud metadata and host-agent endpoints (never re-opened) --------
    //
    // Instance metadata at 169.254.169.254:
    // - AWS: "Access instance metadata for an EC2 instance",
    //   https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html
    // - GCP: "About VM metadata", https://cloud.google.com/compute/docs/metadata/overview
    // - Azure: "Azure Instance Metadata Service",
    //   https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service
    // - DigitalOcean: "Metadata API", https://docs.digitalocean.com/reference/api/metadata/
    // - Hetzner Cloud: "Server metadata" (cloud-init datasource Hetzner),
    //   https://docs.hetzner.cloud/ (metadata at http://169.254.169.254/hetzner/v1/metadata)
    // - OpenStack: "Metadata service" (Nova), https://docs.openstack.org/nova/latest/user/metadata.html
    // - Oracle OCI: "Getting Instance Metadata",
    //   https://docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm
    // - Akamai/Linode: "Use the Metadata service API",
    //   https://techdocs.akamai.com/cloud-computing/docs/metadata-service-api
    // - IBM Cloud VPC, Huawei Cloud, Vultr and others use the same address.
    metadata4(
        [169, 254, 169, 254],
        32,
        "instance metadata: AWS, GCP, Azure, DigitalOcean, Hetzner, OpenStack, Oracle and others",
    ),
    // AWS: "Amazon DNS server" (Route 53 Resolver at the VPC's link-local
    // address), https://docs.aws.amazon.com/vpc/latest/userguide/AmazonDNS-concepts.html
    metadata4([169, 254, 169, 253], 32, "AWS VPC DNS resolver"),
    // AWS: "Set the time for your EC2 instance" (Amazon Time Sync Service),
    // https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/set-time.html
    metadata4([169, 254, 169, 123], 32, "Amazon Time Sync Service"),
    // The rest of the /24 around IMDS: AWS's Windows activation servers
    // (169.254.169.250 and .251, "Troubleshoot Windows activation" in the EC2
    // Windows guide) and GKE's node metadata server for Workload Identity
    // (169.254.169.252, seen in GKE nodes' iptables rules, not in a public
    // page). No image is ever served from here; refusing the block keeps a
    // host service that nobody listed from becoming reachable.
    metadata4(
        [169, 254, 169, 0],
        24,
        "the link-local block of cloud host services around 169.254.169.254",
    ),
    // AWS ECS: "Task metadata endpoint version 2" and the task IAM role
    // credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI) at 169.254.170.2;
    // versions 3 and 4 are served from the same address.
    // https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint-v2.html
    metadata4(
        [169, 254, 170, 2],
        32,
        "AWS ECS task metadata and credentials",
    ),
    // AWS EKS: "Set up the Amazon EKS Pod Identity Agent": the agent listens
    // on 169.254.170.23 (and [fd00:ec2::23]).
    // https://docs.aws.amazon.com/eks/latest/userguide/pod-id-agent-setup.html
    metadata4([169, 254, 170, 23], 32, "AWS EKS Pod Identity Agent"),
    // The rest of AWS's container-credentials /24, for the same reason as
    // the block around IMDS.
    metadata4(
        [169, 254, 170, 0],
        24,
        "AWS's link-local block of container credential endpoints",
    ),
    // Azure: "What is IP address 168.63.129.16?": the WireServer, the host
    // agent's endpoint (guest agent, extensions, health probes, DNS) on
    // every Azure VM. A public address that Azure routes to the host.
    // https://learn.microsoft.com/azure/virtual-network/what-is-ip-address-168-63-129-16
    metadata4(
        [168, 63, 129, 16],
        32,
        "Azure WireServer, the host agent's endpoint",
    ),
    // Alibaba Cloud: "Obtain instance metadata" (ECS metadata at
    // http://100.100.100.200/latest/meta-data/), inside CGNAT space.
    // https://www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata
    metadata4([100, 100, 100, 200], 32, "Alibaba Cloud instance metadata"),
    // Oracle Cloud (Classic/legacy) metadata at http://192.0.0.192/latest/.
    // Not on Oracle's current pages (OCI uses 169.254.169.254); listed by
    // the common SSRF payload collections (PayloadsAllTheThings, "SSRF
    // Cloud Instances", Oracle Cloud).
    metadata4([192, 0, 0, 192], 32, "Oracle Cloud metadata (legacy)"),
    // Tencent Cloud: "Querying Instance Metadata" documents
    // http://metadata.tencentyun.com/latest/meta-data/, which resolves to
    // 169.254.0.23. https://www.tencentcloud.com/document/product/213/4934
    metadata4([169, 254, 0, 23], 32, "Tencent Cloud instance metadata"),
    // Scaleway: the Instance metadata API at http://169.254.42.42/conf
    // (Scaleway documentation "Instance metadata"; the scw-metadata tools).
    metadata4([169, 254, 42, 42], 32, "Scaleway instance metadata"),
    // --- Kubernetes' usual service ranges ----------------------------------
    // Private already; named so a refusal says what is there. kubeadm's
    // default serviceSubnet (kubeadm configuration API, ClusterConfiguration
    // networking.serviceSubnet), also minikube's and kind's:
    named4(
        [10, 96, 0, 0],
        12,
        Reason::Private,
        "Kubernetes' default service range (kubeadm, minikube, kind)",
    ),
    // k3s and RKE2: --service-cidr 10.43.0.0/16, --cluster-cidr (pods)
    // 10.42.0.0/16 (https://docs.k3s.io/cli/server, "Networking").
    named4(
        [10, 43, 0, 0],
        16,
        Reason::Private,
        "k3s/RKE2 default service range",
    ),
    named4(
        [10, 42, 0, 0],
        16,
        Reason::Private,
        "k3s/RKE2 default pod range",
    ),
    // Amazon EKS: "If you don't specify a block, Kubernetes assigns
    // addresses from either the 10.100.0.0/16 or 172.20.0.0/16 CIDR
    // blocks" (EKS API, KubernetesNetworkConfigRequest serviceIpv4Cidr).
    named4(
        [10, 100, 0, 0],
        16,
        Reason::Private,
        "EKS default service range",
    ),
    named4(
        [172, 20, 0, 0],
        16,
        Reason::Private,
        "EKS default service range",
    ),
    // AKS: --service-cidr defaults to 10.0.0.0/16, the cluster DNS at
    // 10.0.0.10 ("Configure Azure CNI networking in AKS").
    named4(
        [10, 0, 0, 0],
        16,
        Reason::Private,
        "AKS default service range",
    ),
    // OpenShift: install-config networking.serviceNetwork 172.30.0.0/16.
    named4(
        [172, 30, 0, 0],
        16,
        Reason::Private,
        "OpenShift default service network",
    ),
    // MicroK8s: the default service CIDR 10.152.183.0/24 (cluster DNS
    // 10.152.183.10).
    named4(
        [10, 152, 183, 0],
        24,
        Reason::Private,
        "MicroK8s default service range",
    ),
    // GKE: the default Service range 34.118.224.0/20 for Autopilot clusters
    // from 1.27 and Standard clusters from 1.29 ("Service IP range" in the
    // GKE networking docs). Public Google space that GKE uses privately:
    // from a pod, 34.118.224.1 is the cluster's API server.
    named4(
        [34, 118, 224, 0],
        20,
        Reason::ClusterService,
        "GKE's default Kubernetes service range",
    ),
    // --- IANA's special-purpose registry ------------------------------------
    r4([0, 0, 0, 0], 8, Reason::Unspecified),
    r4([10, 0, 0, 0], 8, Reason::Private),
    r4([100, 64, 0, 0], 10, Reason::SharedCgnat),
    r4([127, 0, 0, 0], 8, Reason::Loopback),
    r4([169, 254, 0, 0], 16, Reason::LinkLocal),
    r4([172, 16, 0, 0], 12, Reason::Private),
    r4([192, 0, 0, 0], 24, Reason::Reserved),
    r4([192, 0, 2, 0], 24, Reason::Documentation),
    // The deprecated 6to4 relay anycast.
    r4([192, 88, 99, 0], 24, Reason::Reserved),
    r4([192, 168, 0, 0], 16, Reason::Private),
    r4([198, 18, 0, 0], 15, Reason::Benchmarking),
    r4([198, 51, 100, 0], 24, Reason::Documentation),
    r4([203, 0, 113, 0], 24, Reason::Documentation),
    r4([224, 0, 0, 0], 4, Reason::Multicast),
    r4([240, 0, 0, 0], 4, Reason::Reserved),
    r4([255, 255, 255, 255], 32, Reason::Broadcast),
];

#[derive(Debug, Clone, Copy)]
struct Range6 {
    net: Ipv6Addr,
    prefix: u32,
    reason: Reason,
    service: Option<&'static str>,
}

const fn r6(net: [u16; 8], prefix: u32, reason: Reason) -> Range6 {
    Range6 {
        net: Ipv6Addr::new(
            net[0], net[1], net[2], net[3], net[4], net[5], net[6], net[7],
        ),
        prefix,
        reason,
        service: None,
    }
}

const fn named6(net: [u16; 8], prefix: u32, reason: Reason, service: &'static str) -> Range6 {
    Range6 {
        service: Some(service),
        ..r6(net, prefix, reason)
    }
}

const fn metadata6(net: [u16; 8], prefix: u32, service: &'static str) -> Range6 {
    named6(net, prefix, Reason::Metadata, service)
}

/// IPv6 ranges, after the forms that embed an IPv4 address (see [`judge_v6`]).
const V6: &[Range6] = &[
    // --- cloud metadata and host-agent endpoints (never re-opened) --------
    // AWS's IPv6 endpoints on Nitro instances, all in fd00:ec2::/32 (a
    // unique-local prefix, not link-local): IMDS at fd00:ec2::254 ("Access
    // instance metadata for an EC2 instance"), the Amazon DNS server at
    // fd00:ec2::253 ("Amazon DNS server"), the Time Sync Service at
    // fd00:ec2::123 ("Set the time for your EC2 instance"), and the EKS Pod
    // Identity Agent at fd00:ec2::23 ("Set up the Amazon EKS Pod Identity
    // Agent"); pages as for their IPv4 twins above.
    metadata6(
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254],
        128,
        "AWS instance metadata (IPv6)",
    ),
    metadata6(
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x253],
        128,
        "AWS VPC DNS resolver (IPv6)",
    ),
    metadata6(
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x123],
        128,
        "Amazon Time Sync Service (IPv6)",
    ),
    metadata6(
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23],
        128,
        "AWS EKS Pod Identity Agent (IPv6)",
    ),
    // GCP: the metadata server's IPv6 address for IPv6-only VMs,
    // http://[fd20:ce::254]/computeMetadata/v1/ ("About VM metadata").
    metadata6(
        [0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254],
        128,
        "GCP metadata server (IPv6)",
    ),
    // Akamai/Linode: "Use the Metadata service API" lists IPv6
    // fd00:a9fe:a9fe::1 and fe80::a9fe:a9fe; OpenStack Neutron serves
    // metadata on fe80::a9fe:a9fe too ("Metadata service" over IPv6 in the
    // Neutron admin guide).
    metadata6(
        [0xfd00, 0xa9fe, 0xa9fe, 0, 0, 0, 0, 1],
        128,
        "Akamai/Linode instance metadata (IPv6)",
    ),
    metadata6(
        [0xfe80, 0, 0, 0, 0, 0, 0xa9fe, 0xa9fe],
        128,
        "instance metadata over IPv6: OpenStack, Akamai/Linode",
    ),
    // Oracle OCI: IMDS over IPv6 at http://[fd00:c1::a9fe:a9fe]/opc/v2/, as
    // cited by current SSRF deny lists (not checked against Oracle's page
    // here, which names 169.254.169.254).
    metadata6(
        [0xfd00, 0xc1, 0, 0, 0, 0, 0xa9fe, 0xa9fe],
        128,
        "Oracle Cloud instance metadata (IPv6)",
    ),
    // Scaleway: the metadata API's IPv6 address fd00:42::42, the twin of
    // 169.254.42.42 (Scaleway "Instance metadata"; not checked here).
    metadata6(
        [0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42],
        128,
        "Scaleway instance metadata (IPv6)",
    ),
    // --- special-purpose ranges ---------------------------------------------
    r6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Reason::Private),
    r6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, Reason::LinkLocal),
    // Site-local, deprecated but still routed by some stacks.
    r6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Reason::Private),
    r6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Reason::Multicast),
    r6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, Reason::Documentation),
    r6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Reason::Documentation),
    r6([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, Reason::Benchmarking),
    // IETF protocol assignments, Teredo (2001::/32, judged by its embedded
    // addresses first) and ORCHID among them.
    r6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, Reason::Reserved),
    // Discard-only.
    r6([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, Reason::Reserved),
    // Segment-routing SIDs.
    r6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, Reason::Reserved),
];

fn mask(bits: u32, prefix: u32) -> u32 {
    u32::MAX.checked_shl(bits - prefix).unwrap_or(0)
}

fn judge_v4(addr: Ipv4Addr) -> Option<Range4> {
    let addr = addr.to_bits();
    V4.iter()
        .filter(|r| addr & mask(32, r.prefix) == r.net.to_bits() & mask(32, r.prefix))
        .max_by_key(|r| r.prefix)
        .copied()
}

fn in_v6(addr: u128, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    addr & mask == net.to_bits() & mask
}

fn lookup_v6(addr: Ipv6Addr) -> Option<Range6> {
    let bits = addr.to_bits();
    V6.iter()
        .filter(|r| in_v6(bits, r.net, r.prefix))
        .max_by_key(|r| r.prefix)
        .copied()
}

/// IPv6: forms that embed an IPv4 address are judged by that address; then
/// everything outside global unicast (2000::/3), and the special ranges
/// inside it, is refused.
fn judge_v6(addr: Ipv6Addr) -> Option<Refused> {
    let bits = addr.to_bits();
    let refused = |reason: Reason, embedded: Option<Ipv4Addr>, service| {
        Some(Refused {
            addr: IpAddr::V6(addr),
            reason,
            embedded,
            service,
        })
    };
    // The IPv4 verdict on `v4`, carried by `addr`.
    let by_v4 = |v4: Ipv4Addr| {
        judge_v4(v4).and_then(|range| refused(range.reason, Some(v4), range.service))
    };
    if addr.is_unspecified() {
        return refused(Reason::Unspecified, None, None);
    }
    if addr.is_loopback() {
        return refused(Reason::Loopback, None, None);
    }
    let low32 = Ipv4Addr::from_bits(bits as u32);
    // ::ffff:a.b.c.d (mapped): the kernel connects to a.b.c.d.
    if bits >> 32 == 0xffff {
        return by_v4(low32);
    }
    // ::a.b.c.d (compatible, deprecated) and ::ffff:0:a.b.c.d (SIIT's
    // "IPv4-translated"): never a legitimate image host, and an embedded
    // private or metadata address must be named as such.
    if bits >> 32 == 0 || bits >> 32 == 0xffff_0000 {
        return by_v4(low32).or_else(|| refused(Reason::Reserved, None, None));
    }
    // NAT64 (64:ff9b::/96, RFC 6052): a gateway forwards to the embedded
    // IPv4 address.
    if in_v6(bits, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        return by_v4(low32);
    }
    // Local-use NAT64 (64:ff9b:1::/48, RFC 8215) translates into a private
    // network, with a prefix length the operator chose: every RFC 6052
    // position of the IPv4 address is tried for a metadata endpoint.
    if in_v6(bits, Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48) {
        let positions = [
            bits as u32,                                                          // /96
            (bits >> 24) as u32,                                                  // /64
            ((bits >> 64) as u32 & 0xff) << 24 | (bits >> 32) as u32 & 0xff_ffff, // /56
            ((bits >> 64) as u32 & 0xffff) << 16 | (bits >> 40) as u32 & 0xffff,  // /48
        ];
        for v4 in positions.map(Ipv4Addr::from_bits) {
            if let Some(metadata) = by_v4(v4).filter(|r| r.reason == Reason::Metadata) {
                return Some(metadata);
            }
        }
        return refused(Reason::Private, None, None);
    }
    // 6to4 (2002::/16, RFC 3056): the IPv4 address of the relay sits in
    // bits 16..48.
    if in_v6(bits, Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16) {
        return by_v4(Ipv4Addr::from_bits((bits >> 80) as u32));
    }
    // Teredo (2001::/32, RFC 4380): the server's IPv4 address in bits
    // 32..64 and the client's, inverted, in the last 32 bits. Refused as
    // reserved below; a metadata address in either is named (and stays
    // refused should 2001::/32 be allowed).
    if in_v6(bits, Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32) {
        let server = Ipv4Addr::from_bits((bits >> 64) as u32);
        let client = Ipv4Addr::from_bits(!(bits as u32));
        for v4 in [client, server] {
            if let Some(metadata) = by_v4(v4).filter(|r| r.reason == Reason::Metadata) {
                return Some(metadata);
            }
        }
    }
    if let Some(range) = lookup_v6(addr) {
        return refused(range.reason, None, range.service);
    }
    if !in_v6(bits, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) {
        return refused(Reason::NotGlobalUnicast, None, None);
    }
    None
}

// --- names ----------------------------------------------------------------------

/// How a refused name is matched.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// Exactly this name.
    Exact(&'static str),
    /// This name, alone or followed by a domain (`kubernetes.default.svc`
    /// and `kubernetes.default.svc.<cluster domain>`).
    ThenAnyDomain(&'static str),
    /// `<first>.<anything>.<last>`: a label, then a region, then a suffix.
    Around(&'static str, &'static str),
}

impl Pattern {
    fn matches(self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => name == exact,
            Pattern::ThenAnyDomain(head) => name
                .strip_prefix(head)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
            Pattern::Around(first, last) => name
                .strip_prefix(first)
                .and_then(|rest| rest.strip_suffix(last))
                .is_some_and(|middle| {
                    middle.len() > 2 && middle.starts_with('.') && middle.ends_with('.')
                }),
        }
    }
}

/// Names of metadata endpoints and of the Kubernetes API server, refused
/// before any lookup. Their addresses are refused anyway; the names are
/// refused as well because a resolver can answer them with anything (a
/// search domain, a hosts file, an internal zone), and so the error says
/// what was asked for.
const NAMES: &[(Pattern, Reason, &str)] = &[
    // GCP: "About VM metadata": http://metadata.google.internal/computeMetadata/v1/.
    // The bare `metadata` resolves on GCE through the google.internal search
    // domain in the VM's resolv.conf.
    (
        Pattern::Exact("metadata.google.internal"),
        Reason::Metadata,
        "GCP's metadata server",
    ),
    (
        Pattern::Exact("metadata"),
        Reason::Metadata,
        "GCP's metadata server (through the VM's search domain)",
    ),
    // metadata.goog: a public name for the GCP metadata address, refused
    // by the common SSRF deny lists (not on Google's metadata page).
    (
        Pattern::Exact("metadata.goog"),
        Reason::Metadata,
        "GCP's metadata server",
    ),
    // AWS: `instance-data` is the IMDS host name of the EC2 docs' Linux
    // examples; it resolves through the VPC's search domain, which is
    // ec2.internal in us-east-1 and <region>.compute.internal elsewhere
    // ("DNS attributes for your VPC").
    (
        Pattern::Exact("instance-data"),
        Reason::Metadata,
        "AWS's instance metadata service",
    ),
    (
        Pattern::Exact("instance-data.ec2.internal"),
        Reason::Metadata,
        "AWS's instance metadata service",
    ),
    (
        Pattern::Around("instance-data", "compute.internal"),
        Reason::Metadata,
        "AWS's instance metadata service",
    ),
    // Tencent Cloud: "Querying Instance Metadata",
    // http://metadata.tencentyun.com/latest/meta-data/.
    (
        Pattern::Exact("metadata.tencentyun.com"),
        Reason::Metadata,
        "Tencent Cloud's metadata service",
    ),
    // IBM Cloud VPC: "Accessing metadata by using the metadata service",
    // api.metadata.cloud.ibm.com (resolves to 169.254.169.254 on the VSI).
    (
        Pattern::Exact("api.metadata.cloud.ibm.com"),
        Reason::Metadata,
        "IBM Cloud VPC's metadata service",
    ),
    // Equinix Metal (Packet): https://metadata.platformequinix.com/metadata,
    // formerly metadata.packet.net: a public address that answers each
    // server with its own metadata, so only the name can refuse it.
    (
        Pattern::Exact("metadata.platformequinix.com"),
        Reason::Metadata,
        "Equinix Metal's metadata service",
    ),
    (
        Pattern::Exact("metadata.packet.net"),
        Reason::Metadata,
        "Equinix Metal's metadata service",
    ),
    // Kubernetes: the API server's Service in every cluster ("Accessing the
    // Kubernetes API from a Pod": kubernetes.default.svc), under any cluster
    // domain (cluster.local by default), and the short forms a pod's search
    // path completes.
    (
        Pattern::ThenAnyDomain("kubernetes.default.svc"),
        Reason::ClusterService,
        "the Kubernetes API server",
    ),
    (
        Pattern::Exact("kubernetes.default"),
        Reason::ClusterService,
        "the Kubernetes API server",
    ),
    (
        Pattern::Exact("kubernetes"),
        Reason::ClusterService,
        "the Kubernetes API server",
    ),
];

/// Refuses `host` by name if it is a metadata endpoint's or the Kubernetes
/// API server's. Compared in lower case without trailing dots; the URL
/// parser has already decoded percent-escapes and mapped Unicode (IDNA), so
/// `METADATA.Google.Internal.`, `metadata%2Egoogle%2Einternal` and
/// `metadata。google。internal` all arrive here as the same name.
pub fn refused_name(host: &str) -> Option<RefusedName> {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    NAMES
        .iter()
        .find(|(pattern, _, _)| pattern.matches(&name))
        .map(|(_, reason, service)| RefusedName {
            name: name.chars().take(253).collect(),
            reason: *reason,
            service,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(addr: &str) -> Option<Reason> {
        classify(addr.parse().expect("address"))
    }

    #[test]
    fn ipv4_table() {
        for (addr, expected) in [
            ("0.0.0.0", Some(Reason::Unspecified)),
            ("0.1.2.3", Some(Reason::Unspecified)),
            ("10.0.0.1", Some(Reason::Private)),
            ("10.255.255.255", Some(Reason::Private)),
            ("100.64.0.1", Some(Reason::SharedCgnat)),
            ("100.127.255.255", Some(Reason::SharedCgnat)),
            ("100.100.100.200", Some(Reason::Metadata)),
            ("100.100.100.199", Some(Reason::SharedCgnat)),
            ("100.128.0.1", None),
            ("127.0.0.1", Some(Reason::Loopback)),
            ("127.255.255.254", Some(Reason::Loopback)),
            ("169.254.169.254", Some(Reason::Metadata)),
            ("169.254.169.253", Some(Reason::Metadata)),
            ("169.254.169.123", Some(Reason::Metadata)),
            ("169.254.169.250", Some(Reason::Metadata)),
            ("169.254.170.2", Some(Reason::Metadata)),
            ("169.254.170.23", Some(Reason::Metadata)),
            ("169.254.0.23", Some(Reason::Metadata)),
            ("169.254.42.42", Some(Reason::Metadata)),
            ("169.254.0.1", Some(Reason::LinkLocal)),
            ("169.254.171.1", Some(Reason::LinkLocal)),
            ("168.63.129.16", Some(Reason::Metadata)),
            ("168.63.129.15", None),
            ("168.63.129.17", None),
            ("172.16.0.1", Some(Reason::Private)),
            ("172.31.255.255", Some(Reason::Private)),
            ("172.32.0.1", None),
            ("172.15.255.255", None),
            ("192.0.0.1", Some(Reason::Reserved)),
            ("192.0.0.192", Some(Reason::Metadata)),
            ("192.0.2.1", Some(Reason::Documentation)),
            ("192.88.99.1", Some(Reason::Reserved)),
            ("192.168.1.1", Some(Reason::Private)),
            ("198.18.0.1", Some(Reason::Benchmarking)),
            ("198.19.255.255", Some(Reason::Benchmarking)),
            ("198.51.100.7", Some(Reason::Documentation)),
            ("203.0.113.9", Some(Reason::Documentation)),
            ("224.0.0.1", Some(Reason::Multicast)),
            ("239.255.255.250", Some(Reason::Multicast)),
            ("240.0.0.1", Some(Reason::Reserved)),
            ("255.255.255.255", Some(Reason::Broadcast)),
            // Kubernetes' service ranges: private, and GKE's public one.
            ("10.96.0.1", Some(Reason::Private)),
            ("10.43.0.1", Some(Reason::Private)),
            ("10.100.0.1", Some(Reason::Private)),
            ("172.20.0.1", Some(Reason::Private)),
            ("172.30.0.1", Some(Reason::Private)),
            ("10.152.183.1", Some(Reason::Private)),
            ("34.118.224.1", Some(Reason::ClusterService)),
            ("34.118.239.255", Some(Reason::ClusterService)),
            ("34.118.240.0", None),
            ("34.118.223.255", None),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("11.0.0.1", None),
            ("223.255.255.255", None),
        ] {
            assert_eq!(reason(addr), expected, "{addr}");
        }
    }

    #[test]
    fn ipv6_table() {
        for (addr, expected) in [
            ("::", Some(Reason::Unspecified)),
            ("::1", Some(Reason::Loopback)),
            ("fc00::1", Some(Reason::Private)),
            ("fd12:3456::1", Some(Reason::Private)),
            ("fd00:ec2::254", Some(Reason::Metadata)),
            ("fd00:ec2::253", Some(Reason::Metadata)),
            ("fd00:ec2::123", Some(Reason::Metadata)),
            ("fd00:ec2::23", Some(Reason::Metadata)),
            ("fd00:ec2::255", Some(Reason::Private)),
            ("fd20:ce::254", Some(Reason::Metadata)),
            ("fd00:a9fe:a9fe::1", Some(Reason::Metadata)),
            ("fe80::a9fe:a9fe", Some(Reason::Metadata)),
            ("fd00:c1::a9fe:a9fe", Some(Reason::Metadata)),
            ("fd00:42::42", Some(Reason::Metadata)),
            ("fe80::1", Some(Reason::LinkLocal)),
            ("febf::1", Some(Reason::LinkLocal)),
            ("fec0::1", Some(Reason::Private)),
            ("ff02::1", Some(Reason::Multicast)),
            ("2001:db8::1", Some(Reason::Documentation)),
            ("3fff:1::1", Some(Reason::Documentation)),
            ("2001:2::1", Some(Reason::Benchmarking)),
            ("2001::1", Some(Reason::Reserved)),
            ("2001:10::1", Some(Reason::Reserved)),
            ("100::1", Some(Reason::Reserved)),
            ("5f00::1", Some(Reason::Reserved)),
            ("4000::1", Some(Reason::NotGlobalUnicast)),
            ("1234::1", Some(Reason::NotGlobalUnicast)),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001:80b::200e", None),
            ("2001:4860:4860::8888", None),
        ] {
            assert_eq!(reason(addr), expected, "{addr}");
        }
    }

    #[test]
    fn ipv4_embedded_in_ipv6_is_judged_by_the_ipv4_address() {
        for (addr, expected) in [
            // Mapped.
            ("::ffff:127.0.0.1", Some(Reason::Loopback)),
            ("::ffff:7f00:1", Some(Reason::Loopback)),
            ("::ffff:169.254.169.254", Some(Reason::Metadata)),
            ("::ffff:168.63.129.16", Some(Reason::Metadata)),
            ("::ffff:a83f:8110", Some(Reason::Metadata)),
            ("::ffff:100.100.100.200", Some(Reason::Metadata)),
            ("::ffff:10.1.2.3", Some(Reason::Private)),
            ("::ffff:100.64.1.1", Some(Reason::SharedCgnat)),
            ("::ffff:0.0.0.0", Some(Reason::Unspecified)),
            ("::ffff:8.8.8.8", None),
            // Compatible (deprecated): refused even when public.
            ("::127.0.0.1", Some(Reason::Loopback)),
            ("::169.254.169.254", Some(Reason::Metadata)),
            ("::168.63.129.16", Some(Reason::Metadata)),
            ("::10.0.0.1", Some(Reason::Private)),
            ("::8.8.8.8", Some(Reason::Reserved)),
            // SIIT's IPv4-translated form, ::ffff:0:a.b.c.d.
            ("::ffff:0:169.254.169.254", Some(Reason::Metadata)),
            ("::ffff:0:a9fe:a9fe", Some(Reason::Metadata)),
            ("::ffff:0:8.8.8.8", Some(Reason::Reserved)),
            // NAT64.
            ("64:ff9b::127.0.0.1", Some(Reason::Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Reason::Metadata)),
            ("64:ff9b::168.63.129.16", Some(Reason::Metadata)),
            ("64:ff9b::192.168.0.1", Some(Reason::Private)),
            ("64:ff9b::8.8.8.8", None),
            // Local-use NAT64, at each RFC 6052 prefix length.
            ("64:ff9b:1::8.8.8.8", Some(Reason::Private)),
            ("64:ff9b:1::a9fe:a9fe", Some(Reason::Metadata)),
            ("64:ff9b:1::a9:fea9:fe00:0", Some(Reason::Metadata)),
            ("64:ff9b:1:a9:fe:a9fe::", Some(Reason::Metadata)),
            ("64:ff9b:1:a9fe:a9:fe00::", Some(Reason::Metadata)),
            // 6to4.
            ("2002:7f00:1::", Some(Reason::Loopback)),
            ("2002:a9fe:a9fe::1", Some(Reason::Metadata)),
            ("2002:a83f:8110::1", Some(Reason::Metadata)),
            ("2002:c0a8:101::1", Some(Reason::Private)),
            ("2002:0a00:0001:1::1", Some(Reason::Private)),
            ("2002:808:808::1", None),
            // Teredo hides an IPv4 address too: refused as reserved, and as
            // metadata when the server or the (inverted) client is one.
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                Some(Reason::Reserved),
            ),
            ("2001:0:a9fe:a9fe::1", Some(Reason::Metadata)),
            ("2001:0:102:304::5601:5601", Some(Reason::Metadata)),
        ] {
            assert_eq!(reason(addr), expected, "{addr}");
        }
    }

    #[test]
    fn a_refusal_names_the_embedded_address_and_the_service() {
        let judged = |a: &str| {
            judge(a.parse().expect("addr"))
                .expect("refused")
                .to_string()
        };
        assert_eq!(
            judged("168.63.129.16"),
            "168.63.129.16 is a cloud metadata or host-agent endpoint (Azure WireServer, the host agent's endpoint)"
        );
        assert_eq!(
            judged("2002:a9fe:a9fe::1"),
            "2002:a9fe:a9fe::1 embeds 169.254.169.254, a cloud metadata or host-agent endpoint \
             (instance metadata: AWS, GCP, Azure, DigitalOcean, Hetzner, OpenStack, Oracle and others)"
        );
        assert_eq!(
            judged("::ffff:10.1.2.3"),
            "::ffff:10.1.2.3 embeds 10.1.2.3, a private network address"
        );
        assert_eq!(
            judged("10.96.0.1"),
            "10.96.0.1 is a private network address (Kubernetes' default service range (kubeadm, minikube, kind))"
        );
        assert_eq!(judged("::8.8.8.8"), "::808:808 is a reserved address");
    }

    #[test]
    fn every_table_row_is_a_network_address() {
        for range in V4 {
            let net = IpNet::new(IpAddr::V4(range.net), range.prefix as u8).expect("prefix");
            assert_eq!(net.network(), IpAddr::V4(range.net), "{range:?}");
        }
        for range in V6 {
            let net = IpNet::new(IpAddr::V6(range.net), range.prefix as u8).expect("prefix");
            assert_eq!(net.network(), IpAddr::V6(range.net), "{range:?}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_their_range() {
        let policy =
            AddressPolicy::new(&["127.0.0.2/32", "10.1.0.0/16", "fd00::5"]).expect("policy");
        let ok = |a: &str| policy.check(a.parse().expect("addr")).is_ok();
        assert!(ok("127.0.0.2"));
        assert!(
            ok("::ffff:127.0.0.2"),
            "the mapped form of an allowed address"
        );
        assert!(!ok("127.0.0.1"));
        assert!(ok("10.1.200.3"));
        assert!(!ok("10.2.0.1"));
        assert!(ok("fd00::5"));
        assert!(!ok("fd00::6"));
        assert!(!ok("169.254.169.254"));
        assert!(ok("8.8.8.8"));

        let denied = AddressPolicy::default()
            .check("169.254.169.254".parse().expect("addr"))
            .expect_err("refused");
        assert_eq!(denied.reason, Reason::Metadata);
        assert!(
            denied
                .to_string()
                .starts_with("169.254.169.254 is a cloud metadata or host-agent endpoint ("),
            "{denied}"
        );
        assert!(AddressPolicy::new(&["not-a-net"]).is_err());
    }

    #[test]
    fn no_allowed_network_reopens_a_metadata_endpoint() {
        let everything = AddressPolicy::new(&["0.0.0.0/0", "::/0"]).expect("policy");
        let metadata_v4 = V4.iter().filter(|r| r.reason == Reason::Metadata);
        let metadata_v6 = V6.iter().filter(|r| r.reason == Reason::Metadata);
        let mut addrs: Vec<IpAddr> = metadata_v4.map(|r| IpAddr::V4(r.net)).collect();
        addrs.extend(metadata_v6.map(|r| IpAddr::V6(r.net)));
        // The host bits of the two /24 blocks, and embedded forms.
        for extra in [
            "169.254.169.250",
            "169.254.170.99",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "::ffff:0:169.254.169.254",
            "64:ff9b::a83f:8110",
            "64:ff9b:1::a9fe:a9fe",
            "2002:6464:64c8::1",
            "2001:0:a9fe:a9fe::1",
        ] {
            addrs.push(extra.parse().expect("addr"));
        }
        assert!(addrs.len() > 20);
        for addr in addrs {
            let refused = everything.check(addr).expect_err("metadata stays refused");
            assert_eq!(refused.reason, Reason::Metadata, "{addr}");
        }
        // Everything else is open under ::/0 and 0.0.0.0/0.
        for open in [
            "10.0.0.1",
            "169.254.1.1",
            "fd00:ec2::255",
            "34.118.224.1",
            "::1",
        ] {
            assert!(
                everything.check(open.parse().expect("addr")).is_ok(),
                "{open}"
            );
        }

        // Allowing a range that contains a metadata address opens the rest
        // of the range only: CGNAT does not expose Alibaba's metadata,
        // link-local does not expose IMDS, 6to4 and NAT64 do not either.
        for (allowed, open, refused) in [
            ("100.64.0.0/10", "100.64.0.1", "100.100.100.200"),
            ("169.254.0.0/16", "169.254.1.1", "169.254.169.254"),
            ("169.254.0.0/16", "169.254.1.1", "169.254.170.2"),
            ("168.63.129.16/32", "8.8.8.8", "168.63.129.16"),
            ("192.0.0.0/24", "192.0.0.1", "192.0.0.192"),
            ("fd00::/8", "fd00:ec2::1", "fd00:ec2::254"),
            ("fd00::/8", "fd20::1", "fd20:ce::254"),
            ("2002::/16", "2002:808:808::1", "2002:a9fe:a9fe::1"),
            (
                "64:ff9b::/96",
                "64:ff9b::8.8.8.8",
                "64:ff9b::169.254.169.254",
            ),
        ] {
            let policy = AddressPolicy::new(&[allowed]).expect("policy");
            assert!(
                policy.check(open.parse().expect("addr")).is_ok(),
                "{allowed}: {open}"
            );
            let denied = policy
                .check(refused.parse().expect("addr"))
                .expect_err("refused");
            assert_eq!(denied.reason, Reason::Metadata, "{allowed}: {refused}");
        }
    }

    #[test]
    fn metadata_and_cluster_names_are_refused_by_name() {
        for (host, expected) in [
            ("metadata.google.internal", Some(Reason::Metadata)),
            ("METADATA.Google.Internal", Some(Reason::Metadata)),
            ("metadata.google.internal.", Some(Reason::Metadata)),
            ("metadata.google.internal..", Some(Reason::Metadata)),
            ("metadata", Some(Reason::Metadata)),
            ("metadata.", Some(Reason::Metadata)),
            ("metadata.goog", Some(Reason::Metadata)),
            ("instance-data", Some(Reason::Metadata)),
            ("instance-data.ec2.internal", Some(Reason::Metadata)),
            (
                "instance-data.eu-west-1.compute.internal",
                Some(Reason::Metadata),
            ),
            ("metadata.tencentyun.com", Some(Reason::Metadata)),
            ("api.metadata.cloud.ibm.com", Some(Reason::Metadata)),
            ("metadata.platformequinix.com", Some(Reason::Metadata)),
            ("kubernetes.default.svc", Some(Reason::ClusterService)),
            (
                "kubernetes.default.svc.cluster.local",
                Some(Reason::ClusterService),
            ),
            (
                "kubernetes.default.svc.cluster.local.",
                Some(Reason::ClusterService),
            ),
            (
                "kubernetes.default.svc.corp.example",
                Some(Reason::ClusterService),
            ),
            ("kubernetes.default", Some(Reason::ClusterService)),
            ("kubernetes", Some(Reason::ClusterService)),
            // Near misses are names like any other.
            ("metadata.google.internal.example.com", None),
            ("notmetadata.google.internal", None),
            ("metadata.example.com", None),
            ("mymetadata", None),
            ("instance-data.example.com", None),
            ("instance-data.compute.internal", None),
            ("kubernetes.io", None),
            ("kubernetes.default.svcx", None),
            ("xkubernetes.default.svc", None),
            ("images.example.com", None),
        ] {
            assert_eq!(refused_name(host).map(|r| r.reason), expected, "{host}");
        }
        let refused = refused_name("Metadata.Google.Internal.").expect("refused");
        assert_eq!(refused.name, "metadata.google.internal");
        assert_eq!(
            refused.to_string(),
            "the host metadata.google.internal is the name of GCP's metadata server, refused by name"
        );
    }
}
