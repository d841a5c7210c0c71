//! The agent's `file_editor` tool (`str_replace`, `insert`, `undo_edit`)
//! against a real local bubblewrap sandbox: each edit changes exactly what it
//! says or nothing at all, undo walks back edit by edit, and no path (absolute,
//! `..`, or a symlink the agent planted) reaches outside the workspace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use shoal_tests::local_fixture::LocalFixture;
use shoal_worker::agent::tools::{ArgumentError, FileEditor, Tool, ToolContext, ToolOutput};
use shoal_worker::sandbox::{ExecRequest, Sandbox};
use tokio_util::sync::CancellationToken;

/// A provider with its own root and uid range, so these tests run beside
/// any other.
async fn new_fixture(owner: &str) -> LocalFixture {
    LocalFixture::new(
        "editor",
        owner,
        400000,
        "workspace_mb = 16\ntmp_mb = 8\nlimit_processes = 32\n",
    )
    .await
}

async fn edit(
    editor: &FileEditor,
    sandbox: &dyn Sandbox,
    args: Value,
) -> Result<ToolOutput, ArgumentError> {
    let cancel = CancellationToken::new();
    let ctx = ToolContext {
        sandbox,
        cancel: &cancel,
        no_output_timeout: Duration::from_secs(10),
        env: &[],
    };
    editor.call(&args, &ctx).await
}

async fn ok(editor: &FileEditor, sandbox: &dyn Sandbox, args: Value) -> String {
    let output = edit(editor, sandbox, args.clone())
        .await
        .unwrap_or_else(|e| panic!("{args}: {e}"));
    assert!(!output.is_error, "{args}: {}", output.content);
    output.content
}

async fn refused(editor: &FileEditor, sandbox: &dyn Sandbox, args: Value) -> String {
    match edit(editor, sandbox, args.clone()).await {
        Ok(output) => {
            assert!(
                output.is_error,
                "{args} was not refused: {}",
                output.content
            );
            output.content
        }
        Err(ArgumentError(message)) => message,
    }
}

async fn content(sandbox: &dyn Sandbox, path: &str) -> String {
    String::from_utf8(sandbox.read_file(path).await.expect("read")).expect("utf-8")
}

async fn write(sandbox: &dyn Sandbox, path: &str, text: &str) {
    sandbox
        .write_file(path, text.as_bytes())
        .await
        .expect("write");
}

/// Every file under `dir` named `name`.
fn find(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            found.extend(find(&path, name));
        } else if entry.file_name() == name {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn str_replace_changes_the_one_match_and_shows_it() {
    let fixture = new_fixture("replace").await;
    let sandbox = fixture.sandbox().await;
    let editor = FileEditor::default();
    write(&*sandbox, "main.py", "a = 1\nb = 2\nc = 3\n").await;
    let shown = ok(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/main.py", "old_str": "b = 2", "new_str": "b = 20\nb2 = 21"}),
    )
    .await;
    assert_eq!(
        content(&*sandbox, "main.py").await,
        "a = 1\nb = 20\nb2 = 21\nc = 3\n"
    );
    assert!(shown.contains("has been edited"), "{shown}");
    assert!(shown.contains("     2\tb = 20"), "{shown}");
    // A relative path names the same file; an absent new_str deletes.
    ok(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "main.py", "old_str": "b2 = 21\n"}),
    )
    .await;
    assert_eq!(
        content(&*sandbox, "main.py").await,
        "a = 1\nb = 20\nc = 3\n"
    );
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn str_replace_with_an_old_str_that_is_not_there_changes_nothing() {
    let fixture = new_fixture("missing").await;
    let sandbox = fixture.sandbox().await;
    let editor = FileEditor::default();
    write(&*sandbox, "notes.txt", "alpha\nbeta\n").await;
    // Whitespace counts: "beta " is not in the file.
    let message = refused(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/notes.txt", "old_str": "beta ", "new_str": "gamma"}),
    )
    .await;
    assert!(message.contains("did not appear verbatim"), "{message}");
    let message = refused(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/notes.txt", "old_str": "", "new_str": "x"}),
    )
    .await;
    assert!(message.contains("must not be empty"), "{message}");
    let message = refused(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/absent.txt", "old_str": "a", "new_str": "b"}),
    )
    .await;
    assert!(message.contains("does not exist"), "{message}");
    assert_eq!(content(&*sandbox, "notes.txt").await, "alpha\nbeta\n");
    // Nothing was edited, so there is nothing to undo.
    let message = refused(
        &editor,
        &*sandbox,
        json!({"command": "undo_edit", "path": "/workspace/notes.txt"}),
    )
    .await;
    assert!(message.contains("No edit history"), "{message}");
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn str_replace_with_an_old_str_that_matches_twice_changes_nothing() {
    let fixture = new_fixture("ambiguous").await;
    let sandbox = fixture.sandbox().await;
    let editor = FileEditor::default();
    let text = "x = 0\nprint(x)\nx = 0\n";
    write(&*sandbox, "dup.py", text).await;
    let message = refused(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/dup.py", "old_str": "x = 0", "new_str": "x = 1"}),
    )
    .await;
    assert!(message.contains("Multiple occurrences"), "{message}");
    assert!(message.contains("[1, 3]"), "{message}");
    assert_eq!(content(&*sandbox, "dup.py").await, text);
    // Made unique with its context, the same edit goes through.
    ok(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/dup.py", "old_str": "print(x)\nx = 0", "new_str": "print(x)\nx = 1"}),
    )
    .await;
    assert_eq!(
        content(&*sandbox, "dup.py").await,
        "x = 0\nprint(x)\nx = 1\n"
    );
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_at_the_top_the_middle_and_the_end_and_refuses_past_the_end() {
    let fixture = new_fixture("insert").await;
    let sandbox = fixture.sandbox().await;
    let editor = FileEditor::default();
    write(&*sandbox, "list.txt", "one\ntwo\nthree\n").await;
    let insert = |line: Value, text: &str| json!({"command": "insert", "path": "/workspace/list.txt", "insert_line": line, "new_str": text});
    ok(&editor, &*sandbox, insert(json!(0), "zero")).await;
    assert_eq!(
        content(&*sandbox, "list.txt").await,
        "zero\none\ntwo\nthree\n"
    );
    // Line numbers as strings are accepted; several lines go in together.
    let shown = ok(&editor, &*sandbox, insert(json!("2"), "1a\n1b")).await;
    assert!(shown.contains("2 line(s) inserted after line 2"), "{shown}");
    assert_eq!(
        content(&*sandbox, "list.txt").await,
        "zero\none\n1a\n1b\ntwo\nthree\n"
    );
    ok(&editor, &*sandbox, insert(json!(6), "four")).await;
    let full = "zero\none\n1a\n1b\ntwo\nthree\nfour\n";
    assert_eq!(content(&*sandbox, "list.txt").await, full);
    for line in [json!(8), json!(-1), json!(1.5), json!("two")] {
        let message = refused(&editor, &*sandbox, insert(line.clone(), "bad")).await;
        assert!(message.contains("insert_line"), "{line}: {message}");
    }
    assert_eq!(content(&*sandbox, "list.txt").await, full);
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_edit_walks_back_one_edit_at_a_time_then_says_there_is_nothing_left() {
    let fixture = new_fixture("undo").await;
    let sandbox = fixture.sandbox().await;
    let editor = FileEditor::default();
    ok(
        &editor,
        &*sandbox,
        json!({"command": "create", "path": "/workspace/app.rs", "file_text": "fn main() {}\n"}),
    )
    .await;
    ok(
        &editor,
        &*sandbox,
        json!({"command": "str_replace", "path": "/workspace/app.rs", "old_str": "{}", "new_str": "{ run() }"}),
    )
    .await;
    ok(
        &editor,
        &*sandbox,
        json!({"command": "insert", "path": "/workspace/app.rs", "insert_line": 0, "new_str": "// app"}),
    )
    .await;
    write(&*sandbox, "other.rs", "untouched\n").await;
    assert_eq!(
        content(&*sandbox, "app.rs").await,
        "// app\nfn main() { run() }\n"
    );
    let undo = json!({"command": "undo_edit", "path": "/workspace/app.rs"});
    let shown = ok(&editor, &*sandbox, undo.clone()).await;
    assert!(shown.contains("undone"), "{shown}");
    assert_eq!(content(&*sandbox, "app.rs").await, "fn main() { run() }\n");
    ok(&editor, &*sandbox, undo.clone()).await;
    assert_eq!(content(&*sandbox, "app.rs").await, "fn main() {}\n");
    // `create` is not an edit to undo: the file stays as created.
    let message = refused(&editor, &*sandbox, undo).await;
    assert!(message.contains("No edit history"), "{message}");
    assert_eq!(content(&*sandbox, "app.rs").await, "fn main() {}\n");
    // Another file's history is its own.
    let message = refused(
        &editor,
        &*sandbox,
        json!({"command": "undo_edit", "path": "/workspace/other.rs"}),
    )
    .await;
    assert!(message.contains("No edit history"), "{message}");
    assert_eq!(content(&*sandbox, "other.rs").await, "untouched\n");
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_to_paths_outside_the_workspace_are_refused() {
    let fixture = new_fixture("outside").await;
    let sandbox = fixture.sandbox().await;
    let editor = FileEditor::default();
    // A host file the agent would love to change, and a symlink to it planted
    // from inside the sandbox (the tool runs on the host side).
    let target = fixture.root().join("host-secret.txt");
    std::fs::write(&target, "secret\n").expect("host file");
    let planted = sandbox
        .exec(
            &ExecRequest::new(
                format!(
                    "ln -s {} /workspace/link && ln -s .. /workspace/up",
                    target.display()
                ),
                Duration::from_secs(10),
            ),
            &CancellationToken::new(),
        )
        .await
        .expect("exec");
    assert_eq!(planted.exit_code, Some(0), "{}", planted.stderr.text());
    let attempts = [
        json!({"command": "str_replace", "path": "/etc/passwd", "old_str": "root", "new_str": "toor"}),
        json!({"command": "insert", "path": "/etc/passwd", "insert_line": 0, "new_str": "x"}),
        json!({"command": "undo_edit", "path": "/etc/passwd"}),
        json!({"command": "create", "path": "/workspace/../escaped.txt", "file_text": "out"}),
        json!({"command": "create", "path": "../../escaped.txt", "file_text": "out"}),
        json!({"command": "create", "path": "/workspace/up/escaped.txt", "file_text": "out"}),
        json!({"command": "str_replace", "path": "/workspace/link", "old_str": "secret", "new_str": "owned"}),
        json!({"command": "insert", "path": "/workspace/link", "insert_line": 0, "new_str": "owned"}),
        json!({"command": "undo_edit", "path": "/workspace/link"}),
    ];
    for args in attempts {
        let message = refused(&editor, &*sandbox, args.clone()).await;
        // Refused for the path, not for some unrelated reason.
        assert!(
            ["outside the workspace", "not allowed", "No edit history"]
                .iter()
                .any(|why| message.contains(why)),
            "{args}: {message}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&target).expect("host file"),
        "secret\n"
    );
    assert!(
        find(&fixture.root(), "escaped.txt").is_empty(),
        "a file was written outside the workspace"
    );
    assert!(!Path::new("/escaped.txt").exists());
    std::fs::remove_file(&target).expect("remove host file");
    fixture.finish(sandbox).await;
}
