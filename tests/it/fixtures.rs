//! `orchestrator test`: the shipped pipelines pass their fixtures; the
//! CANCELAMENTO example passes its own; wrong expectations fail, naming the
//! case and what differed.

use crate::helpers::*;

fn run_test(dir: &PipelineDir) -> (i32, String) {
    run_on_dir("test", dir)
}

fn example(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("examples/cancelamento").join(name)).expect("example file")
}

#[test]
fn shipped_pipelines_pass_their_fixtures() {
    let (code, out) = run_test(&PipelineDir::shipped());
    assert_eq!(code, 0, "{out}");
    for tipo in ["VENDA", "DEVOLUÇÃO", "ATUALIZAÇÃO_ESTOQUE"] {
        assert!(
            out.contains(&format!("ok    {tipo}: ")),
            "no passing case for {tipo}: {out}"
        );
    }
    assert!(out.contains(" 0 failed"), "{out}");
}

#[test]
fn the_cancelamento_example_passes_its_fixtures() {
    let dir = PipelineDir::shipped();
    dir.write(
        "schemas/cancelamento.schema.json",
        &example("cancelamento.schema.json"),
    )
    .write(
        "pipelines/scripts/cancelamento.rhai",
        &example("cancelamento.rhai"),
    )
    .write("pipelines/cancelamento.yaml", &example("cancelamento.yaml"))
    .write(
        "pipelines/tests/cancelamento.yaml",
        &example("cancelamento.test.yaml"),
    );
    let (code, out) = run_test(&dir);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok    CANCELAMENTO: test sales are rejected, not retried"),
        "{out}"
    );
}

#[test]
fn wrong_expectations_fail_and_say_what_differed() {
    let dir = PipelineDir::shipped();
    dir.write(
        "pipelines/tests/venda.yaml",
        r#"event_type: VENDA
cases:
  - name: wrong route
    dados: {produto_id: P, quantidade: 1, valor: 5}
    expect: {routes: [fraude]}
  - name: wrong enrichment
    dados: {produto_id: P, quantidade: 2, valor: 5}
    expect: {dados: {total: 11}, meta: {moeda: USD, nao_existe: 1}}
  - name: expected invalid but valid
    dados: {produto_id: P, quantidade: 2, valor: 5}
    expect: {outcome: invalid}
  - name: expected valid but invalid
    dados: {produto_id: P, quantidade: 0, valor: 5}
    expect: {outcome: processed}
  - name: right
    dados: {produto_id: P, quantidade: 2, valor: 5}
    expect: {dados: {total: 10}}
"#,
    )
    .write("pipelines/tests/ghost.yaml", "event_type: FANTASMA\ncases: []\n");
    let (code, out) = run_test(&dir);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  VENDA: wrong route"), "{out}");
    assert!(
        out.contains(r#"expected routes ["fraude"], got ["erp"]"#),
        "{out}"
    );
    assert!(out.contains("expected dados.total = 11, got 10.0"), "{out}");
    assert!(out.contains("expected meta.moeda = \"USD\""), "{out}");
    assert!(out.contains("meta.nao_existe"), "{out}");
    assert!(out.contains("expected the schema to refuse the event"), "{out}");
    assert!(out.contains("the schema refused the event: /quantidade"), "{out}");
    assert!(out.contains("ok    VENDA: right"), "{out}");
    assert!(out.contains("no pipeline for event type \"FANTASMA\""), "{out}");
    assert!(out.contains(" 4 failed; 4 files, 1 could not run"), "{out}");

    let empty = PipelineDir::new();
    empty.any_schema().write(
        "pipelines/a.yaml",
        "event_type: A\nschema: any.schema.json\nstages:\n  - plugin: persist\n",
    );
    let (code, out) = run_test(&empty);
    assert_eq!(code, 1, "no fixtures is a failure, not a pass: {out}");
    assert!(out.contains("no fixture files"), "{out}");
}
