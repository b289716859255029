//! Policy evaluation per request with 1,000 rules, for SQL statements and Kubernetes
//! requests, where the deciding rule is the last one or none (the class default). In the mixed
//! policy the rule index skips most rules. In the unindexed one every rule names only a target,
//! which the index does not file, so every rule is tried. Run with
//! `cargo bench -p gateway-user --bench policy`.
//!
//! Criterion reports the mean; the p99 of single decisions, timed one by one, is printed
//! before each group because criterion does not report percentiles.

use std::{
    fmt::Write as _,
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_user::{
    config::TargetClass,
    policy::{KubeRequest, Policy, Request, Subject, Target, load::parse_objects},
    sql::{SqlDialect, StatementInfo, analyze},
};

/// Rules in the benchmark policy.
const RULES: usize = 1000;
/// Single decisions timed for the p99.
const P99_SAMPLES: usize = 200_000;

/// Builds a policy of `RULES` rules that mix subject, kube and SQL conditions, none of which
/// match the benchmark requests until the last rule.
fn policy() -> Policy {
    let mut text = String::from(
        "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: bench}\nspec:\n  defaults:\n    postgres: {action: allow}\n    kube_api: {action: allow}\n  rules:\n",
    );
    for index in 0..RULES - 1 {
        match index % 4 {
            0 => writeln!(
                text,
                "    - {{name: r{index}, subjects: {{namespaces: [team-{index}]}}, sql: {{statementKinds: [delete]}}, action: deny}}"
            ),
            1 => writeln!(
                text,
                "    - {{name: r{index}, sql: {{tables: [table_{index}]}}, action: review}}"
            ),
            2 => writeln!(
                text,
                "    - {{name: r{index}, kube: {{verbs: [create], resources: [res{index}]}}, action: deny}}"
            ),
            _ => writeln!(
                text,
                "    - {{name: r{index}, subjects: {{selector: {{matchLabels: {{app: app{index}}}}}}}, action: deny}}"
            ),
        }
        .expect("write to a String");
    }
    text.push_str("    - {name: last, sql: {tables: [cards]}, action: review}\n");
    let objects = parse_objects(Path::new("bench.yaml"), &text).expect("bench policy parses");
    let policy = Policy::build(objects).expect("bench policy builds");
    assert_eq!(policy.rule_count(), RULES);
    policy
}

/// Builds a policy of `RULES` rules that each name one target only, so none is indexed.
fn unindexed_policy() -> Policy {
    let mut text = String::from(
        "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: flat}\nspec:\n  rules:\n",
    );
    for index in 0..RULES {
        writeln!(
            text,
            "    - {{name: r{index}, targets: {{names: [db-{index}]}}, action: deny}}"
        )
        .expect("write to a String");
    }
    let objects = parse_objects(Path::new("flat.yaml"), &text).expect("flat policy parses");
    Policy::build(objects).expect("flat policy builds")
}

fn subject() -> Subject {
    Subject {
        namespace: Some("payments".into()),
        service_account: Some("api".into()),
        labels: [("app".to_string(), "api".to_string())].into(),
        ..Subject::default()
    }
}

fn print_p99(name: &str, mut decide: impl FnMut()) {
    let mut samples = Vec::with_capacity(P99_SAMPLES);
    for _ in 0..P99_SAMPLES {
        let start = Instant::now();
        decide();
        samples.push(start.elapsed());
    }
    samples.sort_unstable();
    let p50 = samples[P99_SAMPLES / 2];
    let p99 = samples[P99_SAMPLES * 99 / 100];
    eprintln!("{name}: p50 {p50:?}, p99 {p99:?} over {P99_SAMPLES} single decisions");
}

fn bench_decide(c: &mut Criterion) {
    let policy = policy();
    let subject = subject();
    let database = Target {
        class: TargetClass::Postgres,
        name: "payments-db".into(),
    };
    let api = Target {
        class: TargetClass::KubeApi,
        name: "kubernetes".into(),
    };
    let last: StatementInfo =
        analyze("DELETE FROM cards WHERE id = 1", SqlDialect::Postgres).remove(0);
    let none: StatementInfo = analyze("SELECT * FROM accounts", SqlDialect::Postgres).remove(0);
    let kube = KubeRequest {
        verb: "create".into(),
        resource: "secrets".into(),
        namespace: "payments".into(),
        ..KubeRequest::default()
    };

    let cases: [(&str, &Target, Request<'_>); 3] = [
        ("sql_last_rule", &database, Request::Sql(&last)),
        ("sql_default", &database, Request::Sql(&none)),
        ("kube_default", &api, Request::Kube(&kube)),
    ];
    let mut group = c.benchmark_group("policy_1000_rules");
    group.measurement_time(Duration::from_secs(5));
    for (name, target, request) in cases {
        print_p99(name, || {
            black_box(policy.decide(black_box(&subject), target, request));
        });
        group.bench_function(name, |b| {
            b.iter(|| policy.decide(black_box(&subject), target, request))
        });
    }
    let flat = unindexed_policy();
    print_p99("sql_unindexed_worst_case", || {
        black_box(flat.decide(black_box(&subject), &database, Request::Sql(&none)));
    });
    group.bench_function("sql_unindexed_worst_case", |b| {
        b.iter(|| flat.decide(black_box(&subject), &database, Request::Sql(&none)))
    });
    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
