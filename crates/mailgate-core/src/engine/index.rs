//! A read-only index over a [`Directory`], built once per directory change, so that a decision is
//! a handful of hash lookups instead of scans over every user, key and group.

use std::collections::HashMap as StdHashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::directory::{
    ApiKey, DelegationGrant, Directory, EffectiveLimits, EffectiveOrgUnit, OAuthClient, Policy,
    Project, SendAsStatus, ServiceAccount, User, permissions,
};

/// A fast non-cryptographic hasher (the FxHash mix) for the index and the in-memory counters.
///
/// Lookups use attacker-supplied strings, but only tables built from the directory (admin data)
/// or keyed by authenticated principals are ever inserted into, so hash-flooding does not apply;
/// SipHash was a large share of a decision's time.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A `HashMap` with [`FxHasher`].
pub type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<FxHasher>>;

/// How a user may use an address as sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// The user's primary address.
    Primary,
    /// One of the user's aliases.
    Alias,
    /// An accepted send-as address.
    SendAs,
    /// A send-as address still pending verification (`sender.unverified`).
    PendingSendAs,
    /// A group address the user is a member of, with `members_can_send_as`.
    Group,
    /// The primary address or an alias of a mailbox the user is a delegate of.
    DelegatedMailbox(String),
}

impl Ownership {
    /// Short description for traces.
    pub fn describe(&self) -> &'static str {
        match self {
            Ownership::Primary => "primary address",
            Ownership::Alias => "alias",
            Ownership::SendAs => "accepted send-as address",
            Ownership::PendingSendAs => "send-as address pending verification",
            Ownership::Group => "group address (members_can_send_as)",
            Ownership::DelegatedMailbox(_) => "delegated mailbox",
        }
    }
}

/// Precomputed facts about one user.
#[derive(Debug, Clone)]
pub struct UserFacts {
    /// Lower-case primary address (the counter key).
    pub primary: String,
    /// Org unit settings after inheritance.
    pub org_unit: EffectiveOrgUnit,
    /// Limits after inheritance.
    pub limits: EffectiveLimits,
    /// Where `mail.send` comes from (`organisation.default_permissions` or `roles[<name>]`);
    /// `None`: the user lacks it.
    pub send_permission: Option<String>,
    /// Every address the user may use as sender, lower case, with how.
    pub owned: Vec<(String, Ownership)>,
    /// Lower-case primary addresses of the user's mailbox delegates.
    pub delegates: Vec<String>,
    /// Indexes (into `Directory::policies`) of the policies that apply to the user.
    pub policies: Vec<usize>,
}

/// The directory plus lookup tables. Cheap to share (`Arc<DirectoryIndex>`); rebuild it with
/// [`DirectoryIndex::new`] whenever the directory changes.
#[derive(Debug, Clone)]
pub struct DirectoryIndex {
    dir: Directory,
    users_by_primary: HashMap<String, usize>,
    users_by_address: HashMap<String, usize>,
    user_facts: Vec<UserFacts>,
    keys: HashMap<String, usize>,
    clients: HashMap<String, usize>,
    service_accounts: HashMap<String, usize>,
    projects: HashMap<String, usize>,
    grants: HashMap<String, usize>,
    domains: HashMap<String, bool>,
    everyone_policies: Vec<usize>,
    org_limits: EffectiveLimits,
}

fn lc(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Whether `path` is `unit` or below it.
pub(crate) fn ou_within(path: &str, unit: &str) -> bool {
    unit == "/"
        || path == unit
        || (path.len() > unit.len()
            && path.starts_with(unit)
            && path.as_bytes().get(unit.len()) == Some(&b'/'))
}

impl DirectoryIndex {
    /// Builds the index (copies the directory so the index is self-contained).
    pub fn new(dir: &Directory) -> DirectoryIndex {
        let dir = dir.clone();
        let mut users_by_primary =
            HashMap::with_capacity_and_hasher(dir.users.len(), Default::default());
        let mut users_by_address =
            HashMap::with_capacity_and_hasher(dir.users.len() * 2, Default::default());
        for (i, u) in dir.users.iter().enumerate() {
            users_by_primary.entry(lc(&u.email)).or_insert(i);
            users_by_address.entry(lc(&u.email)).or_insert(i);
            for a in &u.aliases {
                users_by_address.entry(lc(a)).or_insert(i);
            }
        }
        // Groups each user may send as.
        let mut group_send_as: HashMap<String, Vec<String>> = HashMap::default();
        let mut member_of: HashMap<String, Vec<String>> = HashMap::default();
        for g in &dir.groups {
            for m in &g.members {
                member_of.entry(lc(m)).or_default().push(lc(&g.email));
                if g.members_can_send_as {
                    group_send_as.entry(lc(m)).or_default().push(lc(&g.email));
                }
            }
        }
        // Mailboxes each user is a delegate of.
        let mut delegate_of: HashMap<String, Vec<usize>> = HashMap::default();
        for (i, u) in dir.users.iter().enumerate() {
            for d in &u.delegates {
                delegate_of.entry(lc(d)).or_default().push(i);
            }
        }
        let roles: StdHashMap<&str, &Vec<String>> = dir
            .roles
            .iter()
            .map(|r| (r.name.as_str(), &r.permissions))
            .collect();
        let everyone_policies: Vec<usize> = dir
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.applies_to.users.is_empty()
                    && p.applies_to.groups.is_empty()
                    && p.applies_to.org_units.is_empty()
            })
            .map(|(i, _)| i)
            .collect();

        let user_facts = dir
            .users
            .iter()
            .map(|u| {
                let primary = lc(&u.email);
                let groups = member_of.get(&primary).map(Vec::as_slice).unwrap_or(&[]);
                let mut owned = vec![(primary.clone(), Ownership::Primary)];
                owned.extend(u.aliases.iter().map(|a| (lc(a), Ownership::Alias)));
                owned.extend(u.send_as.iter().map(|s| {
                    (
                        lc(&s.email),
                        match s.status {
                            SendAsStatus::Accepted => Ownership::SendAs,
                            SendAsStatus::Pending => Ownership::PendingSendAs,
                        },
                    )
                }));
                if let Some(gs) = group_send_as.get(&primary) {
                    owned.extend(gs.iter().map(|g| (g.clone(), Ownership::Group)));
                }
                if let Some(ms) = delegate_of.get(&primary) {
                    for &m in ms {
                        let mb = &dir.users[m];
                        let mp = lc(&mb.email);
                        owned.push((mp.clone(), Ownership::DelegatedMailbox(mp.clone())));
                        owned.extend(
                            mb.aliases
                                .iter()
                                .map(|a| (lc(a), Ownership::DelegatedMailbox(mp.clone()))),
                        );
                    }
                }
                let send_permission = send_permission(&dir, &roles, u);
                let org_unit = dir.effective_org_unit(&u.org_unit);
                let policies = dir
                    .policies
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| policy_applies(p, &primary, &u.org_unit, groups))
                    .map(|(i, _)| i)
                    .collect();
                UserFacts {
                    limits: dir.effective_limits(u),
                    primary,
                    org_unit,
                    send_permission,
                    owned,
                    delegates: u.delegates.iter().map(|d| lc(d)).collect(),
                    policies,
                }
            })
            .collect();

        let keys = dir
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.id.clone(), i))
            .collect();
        let clients = dir
            .oauth_clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.client_id.clone(), i))
            .collect();
        let service_accounts = dir
            .service_accounts
            .iter()
            .enumerate()
            .map(|(i, s)| (lc(&s.email), i))
            .collect();
        let projects = dir
            .projects
            .iter()
            .enumerate()
            .flat_map(|(i, p)| [(p.id.clone(), i), (p.number.clone(), i)])
            .collect();
        let grants = dir
            .domain_wide_delegation
            .iter()
            .enumerate()
            .map(|(i, g)| (g.client_id.clone(), i))
            .collect();
        let domains = dir
            .domains
            .iter()
            .map(|d| (lc(&d.name), d.verified))
            .collect();
        let org_limits = dir.limits.resolve();
        DirectoryIndex {
            users_by_primary,
            users_by_address,
            user_facts,
            keys,
            clients,
            service_accounts,
            projects,
            grants,
            domains,
            everyone_policies,
            org_limits,
            dir,
        }
    }

    /// The directory this index was built from.
    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// A user by primary address (case-insensitive).
    pub fn user_by_primary(&self, email: &str) -> Option<usize> {
        lookup_lc(&self.users_by_primary, email)
    }

    /// A user by primary address or alias (case-insensitive).
    pub fn user_by_address(&self, email: &str) -> Option<usize> {
        lookup_lc(&self.users_by_address, email)
    }

    /// The user at `i`.
    pub fn user(&self, i: usize) -> &User {
        &self.dir.users[i]
    }

    /// Precomputed facts of the user at `i`.
    pub fn facts(&self, i: usize) -> &UserFacts {
        &self.user_facts[i]
    }

    /// An API key by id.
    pub fn key(&self, id: &str) -> Option<&ApiKey> {
        self.keys.get(id).map(|&i| &self.dir.api_keys[i])
    }

    /// An OAuth client by id.
    pub fn client(&self, id: &str) -> Option<&OAuthClient> {
        self.clients.get(id).map(|&i| &self.dir.oauth_clients[i])
    }

    /// A service account by address.
    pub fn service_account(&self, email: &str) -> Option<&ServiceAccount> {
        lookup_lc(&self.service_accounts, email).map(|i| &self.dir.service_accounts[i])
    }

    /// A project by id or number.
    pub fn project(&self, id_or_number: &str) -> Option<&Project> {
        self.projects
            .get(id_or_number)
            .map(|&i| &self.dir.projects[i])
    }

    /// The domain-wide delegation grant for a service account's client id.
    pub fn grant(&self, client_id: &str) -> Option<&DelegationGrant> {
        self.grants
            .get(client_id)
            .map(|&i| &self.dir.domain_wide_delegation[i])
    }

    /// `Some(verified)` when `domain` is one of the organisation's domains.
    pub fn domain(&self, domain: &str) -> Option<bool> {
        lookup_lc(&self.domains, domain)
    }

    /// Whether `domain` is an organisation domain or a subdomain of one.
    pub fn is_org_domain_or_sub(&self, domain: &str) -> bool {
        let mut d = domain;
        loop {
            if self.domain(d).is_some() {
                return true;
            }
            match d.split_once('.') {
                Some((_, rest)) if rest.contains('.') => d = rest,
                _ => return false,
            }
        }
    }

    /// Policies that apply to everyone (used for principals that are not users).
    pub fn everyone_policies(&self) -> &[usize] {
        &self.everyone_policies
    }

    /// The policy at `i`.
    pub fn policy(&self, i: usize) -> &Policy {
        &self.dir.policies[i]
    }

    /// Organisation-wide limits (for principals that are not users).
    pub fn org_limits(&self) -> &EffectiveLimits {
        &self.org_limits
    }
}

fn lookup_lc<V: Copy>(map: &HashMap<String, V>, key: &str) -> Option<V> {
    if key.bytes().any(|b| b.is_ascii_uppercase()) {
        map.get(&key.to_ascii_lowercase()).copied()
    } else {
        map.get(key).copied()
    }
}

fn send_permission(
    dir: &Directory,
    roles: &StdHashMap<&str, &Vec<String>>,
    u: &User,
) -> Option<String> {
    if dir
        .organisation
        .default_permissions
        .iter()
        .any(|p| p == permissions::MAIL_SEND)
    {
        return Some("organisation.default_permissions".to_owned());
    }
    u.roles.iter().find_map(|r| {
        roles
            .get(r.as_str())
            .filter(|ps| ps.iter().any(|p| p == permissions::MAIL_SEND))
            .map(|_| format!("roles[{r}]"))
    })
}

/// Whether a policy applies to a user (empty scope: everyone).
pub(crate) fn policy_applies(p: &Policy, primary: &str, org_unit: &str, groups: &[String]) -> bool {
    let s = &p.applies_to;
    if s.users.is_empty() && s.groups.is_empty() && s.org_units.is_empty() {
        return true;
    }
    s.users.iter().any(|u| u.eq_ignore_ascii_case(primary))
        || s.org_units.iter().any(|ou| ou_within(org_unit, ou))
        || s.groups
            .iter()
            .any(|g| groups.iter().any(|m| m.eq_ignore_ascii_case(g)))
}
