//! A local bubblewrap provider of one test's own: its own sandbox root and a
//! uid range picked at random (claims go through the host-wide claim
//! directory, so parallel test processes never share a uid), one `default`
//! template, and a finish that fails the test if a sandbox is left behind.

use std::path::PathBuf;

use shoal_shared::settings::Settings;
use shoal_shared::template::Template;
use shoal_worker::sandbox::{LocalProvider, Sandbox, SandboxProvider};

pub struct LocalFixture {
    pub provider: LocalProvider,
    pub settings: Settings,
    pub template: Template,
}

impl LocalFixture {
    /// A provider named `owner` under `<tmp>/shoal-test-sandboxes/<suite>-<owner>-<id>`,
    /// with uids from `uid_floor` up; `template` holds extra keys of the
    /// `default` template.
    pub async fn new(suite: &str, owner: &str, uid_floor: u32, template: &str) -> Self {
        Self::with_keys(suite, owner, uid_floor, "", template).await
    }

    /// As [`LocalFixture::new`], with extra `[sandbox]` keys too.
    pub async fn with_keys(
        suite: &str,
        owner: &str,
        uid_floor: u32,
        sandbox: &str,
        template: &str,
    ) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let root = std::env::temp_dir()
            .join("shoal-test-sandboxes")
            .join(format!("{suite}-{owner}-{}", &id[id.len() - 8..]));
        let slot = u32::from_str_radix(&id[id.len() - 4..], 16).unwrap_or(0) % 2000;
        let uid_base = uid_floor + slot * 64;
        let settings = Settings::from_toml(&format!(
            "sandbox.root = \"{}\"\nsandbox.uid_base = {uid_base}\nsandbox.uid_count = 64\n\
             sandbox.max_output_bytes = 1048576\n{sandbox}\
             [sandbox.templates.default]\nmin_idle = 0\n{template}",
            root.display()
        ))
        .expect("settings");
        let template = settings.sandbox.templates["default"].clone();
        let provider = LocalProvider::new(settings.sandbox.clone(), owner)
            .await
            .expect("provider");
        Self {
            provider,
            settings,
            template,
        }
    }

    pub async fn sandbox(&self) -> Box<dyn Sandbox> {
        self.provider.create(&self.template).await.expect("create")
    }

    /// The provider's root folder.
    pub fn root(&self) -> PathBuf {
        self.settings.sandbox.root.clone()
    }

    /// The host directory `sandbox` sees as /workspace.
    pub fn workspace(&self, sandbox: &dyn Sandbox) -> PathBuf {
        self.provider
            .owner_dir()
            .join(sandbox.id())
            .join("fs")
            .join("workspace")
    }

    /// Destroys `sandbox` and fails if anything of it or of the provider is left.
    pub async fn finish(self, sandbox: Box<dyn Sandbox>) {
        let id = sandbox.id().to_owned();
        drop(sandbox);
        self.provider.destroy(&id).await.expect("destroy");
        let dir = self.provider.owner_dir().join(&id);
        assert!(!dir.exists(), "workspace {} left behind", dir.display());
        let owned = self.provider.list_owned().await.expect("list");
        assert!(owned.is_empty(), "sandboxes left behind: {owned:?}");
        let _ = std::fs::remove_dir_all(&self.settings.sandbox.root);
    }
}

/// One sandbox on a fixture of its own, for suites that drive a single
/// sandbox per test (the conversation loop's).
pub struct OneSandbox {
    fixture: LocalFixture,
    pub sandbox: Box<dyn Sandbox>,
}

impl OneSandbox {
    /// A 32 MB workspace and 8 MB /tmp, uids from `uid_floor` up.
    pub async fn new(suite: &str, owner: &str, uid_floor: u32) -> Self {
        let fixture =
            LocalFixture::new(suite, owner, uid_floor, "workspace_mb = 32\ntmp_mb = 8\n").await;
        let sandbox = fixture.sandbox().await;
        Self { fixture, sandbox }
    }

    /// Destroys the sandbox and fails if anything of it is left.
    pub async fn finish(self) {
        self.fixture.finish(self.sandbox).await;
    }
}
