package peft_test

import (
	"bytes"
	"encoding/json"
	"log"
	"os"
	"regexp"
	"testing"

	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/stretchr/testify/require"

	"peft/peft"
)

// handLayout is a two-block model's linear layers, built by hand (no graph, no backend).
func handLayout() *peft.Layout {
	var linears []*peft.LinearLayer
	for _, block := range []string{"0", "1"} {
		for _, name := range []string{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
			"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} {
			path := "model.layers." + block + "." + name
			linears = append(linears, &peft.LinearLayer{Path: path, In: 4, Out: 4, Layer: peft.LayerIndex(path)})
		}
	}
	linears = append(linears, &peft.LinearLayer{Path: "score", In: 4, Out: 2, Head: true, Layer: -1})
	return &peft.Layout{Linears: linears, NumLayers: 2}
}

func TestTargetsMatches(t *testing.T) {
	q0 := &peft.LinearLayer{Path: "model.layers.0.self_attn.q_proj"}
	up1 := &peft.LinearLayer{Path: "model.layers.1.mlp.up_proj"}
	head := &peft.LinearLayer{Path: "score", Head: true}
	lmHead := &peft.LinearLayer{Path: "lm_head", Head: true}
	for _, tc := range []struct {
		name    string
		targets peft.Targets
		layer   *peft.LinearLayer
		want    bool
	}{
		{"name as suffix after a dot", peft.TargetNames("q_proj"), q0, true},
		{"one of several names", peft.TargetNames("k_proj", "up_proj"), up1, true},
		{"name is the whole path", peft.TargetNames("model.layers.0.self_attn.q_proj"), q0, true},
		{"dotted suffix", peft.TargetNames("self_attn.q_proj"), q0, true},
		{"partial name does not match", peft.TargetNames("proj"), q0, false},
		{"suffix not after a dot", peft.TargetNames("_proj"), q0, false},
		{"prefix does not match", peft.TargetNames("model"), q0, false},
		{"other name", peft.TargetNames("v_proj"), q0, false},
		{"head by name", peft.TargetNames("score"), head, true},
		{"regex over the whole path", peft.TargetPattern(`.*\.(q_proj|v_proj)`), q0, true},
		{"regex must match the whole path", peft.TargetPattern(`q_proj`), q0, false},
		{"regex anchored at the start", peft.TargetPattern(`layers\.0\..*`), q0, false},
		{"regex alternation stays anchored", peft.TargetPattern(`score|q_proj`), q0, false},
		{"regex alternation, whole path", peft.TargetPattern(`score|q_proj`), head, true},
		{"regex by block", peft.TargetPattern(`model\.layers\.1\..*`), up1, true},
		{"regex other block", peft.TargetPattern(`model\.layers\.1\..*`), q0, false},
		{"regex may select a head", peft.TargetPattern(`score`), head, true},
		{"all-linear", peft.TargetPattern(peft.AllLinear), q0, true},
		{"all-linear skips the classifier", peft.TargetPattern(peft.AllLinear), head, false},
		{"all-linear skips the lm head", peft.TargetPattern(peft.AllLinear), lmHead, false},
		{"invalid regex matches nothing", peft.TargetPattern(`q_proj(`), q0, false},
		{"zero targets match nothing", peft.Targets{}, q0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, tc.targets.Matches(tc.layer))
		})
	}
}

func TestTargetsSelect(t *testing.T) {
	layout := handLayout()
	for _, tc := range []struct {
		name    string
		targets peft.Targets
		want    []string // in model order
	}{
		{"names", peft.TargetNames("v_proj", "q_proj"), []string{
			"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
			"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}},
		{"full path", peft.TargetNames("model.layers.1.mlp.down_proj"), []string{"model.layers.1.mlp.down_proj"}},
		{"regex", peft.TargetPattern(`model\.layers\.0\.mlp\..*`), []string{
			"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}},
		{"head by name", peft.TargetNames("score"), []string{"score"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			selected, err := tc.targets.Select(layout)
			require.NoError(t, err)
			var paths []string
			for _, l := range selected {
				paths = append(paths, l.Path)
			}
			require.Equal(t, tc.want, paths)
		})
	}

	all, err := peft.TargetPattern(peft.AllLinear).Select(layout)
	require.NoError(t, err)
	require.Len(t, all, 14, "all-linear: the 14 block layers, not the head")
	for _, l := range all {
		require.False(t, l.Head, l.Path)
	}

	_, err = peft.TargetNames("proj").Select(layout)
	require.ErrorContains(t, err, `target modules ["proj"] match no linear layer`)
	require.ErrorContains(t, err, "linear layers are named down_proj, gate_proj, k_proj, o_proj, q_proj, score, up_proj, v_proj (paths such as model.layers.0.self_attn.q_proj)",
		"the error names the layers that exist")
	_, err = peft.TargetPattern("q_proj").Select(layout)
	require.ErrorContains(t, err, `target modules "q_proj" match no linear layer`)
	_, err = peft.Targets{}.Select(layout)
	require.ErrorContains(t, err, "no target modules given", "Select validates first")
}

func TestTargetsValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		targets peft.Targets
		want    string // "" for valid
	}{
		{"names", peft.TargetNames("q_proj"), ""},
		{"pattern", peft.TargetPattern(`.*q_proj`), ""},
		{"all-linear", peft.TargetPattern(peft.AllLinear), ""},
		{"empty", peft.Targets{}, "no target modules given"},
		{"empty names list", peft.TargetNames(), "no target modules given"},
		{"both", peft.Targets{Pattern: ".*", Names: []string{"q_proj"}}, "either a pattern or a list of names, not both"},
		{"bad regex", peft.TargetPattern("q_proj("), `target pattern "q_proj(" is not a valid regular expression`},
		{"empty name", peft.TargetNames("q_proj", ""), `empty name in ["q_proj" ""]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.targets.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestTargetsJSON(t *testing.T) {
	type cfg struct {
		TargetModules peft.Targets `json:"target_modules"`
	}
	for _, tc := range []struct {
		name    string
		targets peft.Targets
		json    string
	}{
		{"pattern is a string", peft.TargetPattern(`.*\.(q|v)_proj`), `{"target_modules":".*\\.(q|v)_proj"}`},
		{"all-linear is a string", peft.TargetPattern(peft.AllLinear), `{"target_modules":"all-linear"}`},
		{"names are a list", peft.TargetNames("q_proj", "v_proj"), `{"target_modules":["q_proj","v_proj"]}`},
		{"one name is a list", peft.TargetNames("q_proj"), `{"target_modules":["q_proj"]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data, err := json.Marshal(cfg{tc.targets})
			require.NoError(t, err)
			require.JSONEq(t, tc.json, string(data))
			var back cfg
			require.NoError(t, json.Unmarshal([]byte(tc.json), &back))
			require.Equal(t, tc.targets, back.TargetModules)
		})
	}
	// HF configs as written by Python.
	var c cfg
	require.NoError(t, json.Unmarshal([]byte(`{"target_modules": ["k_proj", "o_proj"]}`), &c))
	require.Equal(t, peft.TargetNames("k_proj", "o_proj"), c.TargetModules)
	for _, bad := range []string{`{"target_modules": 3}`, `{"target_modules": {"a": 1}}`, `{"target_modules": [1, 2]}`} {
		err := json.Unmarshal([]byte(bad), &c)
		require.ErrorContains(t, err, "target modules must be a string or a list of strings", bad)
	}
}

func TestTargetsString(t *testing.T) {
	require.Equal(t, `"all-linear"`, peft.TargetPattern(peft.AllLinear).String())
	require.Equal(t, `["q_proj" "v_proj"]`, peft.TargetNames("q_proj", "v_proj").String())
	require.True(t, peft.Targets{}.IsZero())
	require.False(t, peft.TargetNames("x").IsZero())
}

func TestPatternsLookup(t *testing.T) {
	// In file order: `layers\.0\..*` comes first, so it wins on block 0 (PEFT's rule: the first
	// matching key in the config's order).
	var patterns peft.Patterns[int]
	require.NoError(t, json.Unmarshal([]byte(`{
		"layers\\.0\\..*": 1,
		"q_proj": 4,
		"mlp\\.(up|down)_proj": 16,
		"model\\.layers\\.1\\.mlp": 99,
		"self_attn\\.k_proj|o_pr": 7}`), &patterns))
	require.Equal(t, `layers\.0\..*`, patterns[0].Key)
	for _, tc := range []struct {
		path  string
		want  int
		found bool
	}{
		{"model.layers.1.self_attn.q_proj", 4, true},
		{"model.layers.0.self_attn.q_proj", 1, true}, // the first key wins
		{"model.layers.0.mlp.up_proj", 1, true},
		{"model.layers.1.mlp.up_proj", 16, true},
		{"model.layers.1.mlp.down_proj", 16, true},
		{"model.layers.1.mlp.gate_proj", 0, false},     // `model\.layers\.1\.mlp` must reach the end
		{"model.layers.1.self_attn.k_proj", 7, true},   // `(.*\.)?(k_proj|o_pr)$`: the alternation is grouped
		{"model.layers.1.self_attn.o_proj", 0, false},  // "o_pr" must reach the end of the path
		{"model.layers.1.self_attn.xq_proj", 0, false}, // suffix must follow a dot
		{"q_proj", 4, true},                            // or be the whole path
	} {
		got, found := patterns.Lookup(tc.path)
		require.Equal(t, tc.found, found, tc.path)
		require.Equal(t, tc.want, got, tc.path)
	}
	// Order decides, not the keys' sort order.
	reversed := peft.Patterns[string]{{Key: `x\.b_proj`, Value: "full"}, {Key: "b_proj", Value: "b"}}
	got, _ := reversed.Lookup("x.b_proj")
	require.Equal(t, "full", got)
	got, _ = peft.Patterns[string]{reversed[1], reversed[0]}.Lookup("x.b_proj")
	require.Equal(t, "b", got)
	_, found := peft.Patterns[int]{}.Lookup("q_proj")
	require.False(t, found)
	_, found = peft.Patterns[int]{{Key: "q_proj(", Value: 1}}.Lookup("q_proj(")
	require.False(t, found, "an invalid key matches nothing")

	// JSON keeps the order both ways; duplicates and non-objects are errors.
	data, err := json.Marshal(patterns)
	require.NoError(t, err)
	require.Equal(t, `{"layers\\.0\\..*":1,"q_proj":4,"mlp\\.(up|down)_proj":16,"model\\.layers\\.1\\.mlp":99,"self_attn\\.k_proj|o_pr":7}`, string(data))
	require.Error(t, json.Unmarshal([]byte(`{"a": 1, "a": 2}`), &patterns))
	require.Error(t, json.Unmarshal([]byte(`[1]`), &patterns))
	require.NoError(t, json.Unmarshal([]byte(`null`), &patterns))
	require.Nil(t, patterns)

	require.NoError(t, peft.Patterns[int]{{Key: "q_proj", Value: 1}}.Validate("rank_pattern"))
	require.ErrorContains(t, peft.Patterns[int]{{Key: "q_proj(", Value: 2}}.Validate("rank_pattern"),
		`rank_pattern key "q_proj(" is not a valid regular expression`)
}

// handVariables builds a classifier's base variables in a fresh context: embeddings, two blocks
// with norms and a projection, the final norm and the score head.
func handVariables() (*context.Context, *peft.Layout) {
	ctx := context.New()
	model := ctx.In("model")
	layout := &peft.Layout{NumLayers: 2}
	add := func(scope *context.Context, name string, n int) {
		layout.BaseVariables = append(layout.BaseVariables, peft.NewVariable(scope, name, make([]float32, n), n))
	}
	add(model.In("embed_tokens"), "embeddings", 6)
	for _, block := range []string{"0", "1"} {
		layer := model.In("layers").In(block)
		add(layer.In("input_layernorm"), "weight", 2)
		add(layer.In("self_attn").In("q_proj").In("dense"), "weights", 4)
	}
	add(model.In("norm"), "weight", 2)
	add(ctx.In("score").In("dense"), "weights", 4)
	add(ctx.In("score").In("dense"), "biases", 2)
	return ctx, layout
}

func TestModulesToSave(t *testing.T) {
	_, layout := handVariables()
	for _, tc := range []struct {
		name  string
		names []string
		want  []string // ScopeAndName of the variables, in order
	}{
		{"head", []string{"score"}, []string{"/score/dense/weights", "/score/dense/biases"}},
		{"nested path", []string{"model.norm"}, []string{"/model/norm/weight"}},
		{"last element", []string{"norm"}, []string{"/model/norm/weight"}}, // not input_layernorm
		{"module with sub-modules", []string{"layers.1"}, []string{
			"/model/layers/1/input_layernorm/weight", "/model/layers/1/self_attn/q_proj/dense/weights"}},
		{"sub-module by dotted suffix", []string{"score.dense"}, []string{"/score/dense/weights", "/score/dense/biases"}},
		{"several", []string{"embed_tokens", "score"}, []string{
			"/model/embed_tokens/embeddings", "/score/dense/weights", "/score/dense/biases"}},
		{"overlapping names select each variable once", []string{"score", "score.dense", "score"},
			[]string{"/score/dense/weights", "/score/dense/biases"}},
		{"none", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vars, err := peft.ModulesToSave(layout, tc.names)
			require.NoError(t, err)
			var got []string
			for _, v := range vars {
				got = append(got, v.ScopeAndName())
			}
			require.Equal(t, tc.want, got)
		})
	}
	for _, tc := range []struct {
		names []string
		want  string
	}{
		{[]string{"classifier"}, `modules_to_save: "classifier" matches no module of the model`},
		{[]string{"sco", "classifier"}, `modules_to_save: none of ["sco" "classifier"] matches a module`},
		{[]string{"dense.weights"}, `"dense.weights" matches no module`}, // variable names are not modules
		{[]string{"layers.2"}, `"layers.2" matches no module`},
	} {
		_, err := peft.ModulesToSave(layout, tc.names)
		require.ErrorContains(t, err, tc.want)
	}
	// As in PEFT, whose classifiers save ["classifier", "score"]: names matching nothing are
	// skipped with a log line when another matches.
	var logged bytes.Buffer
	log.SetOutput(&logged)
	defer log.SetOutput(os.Stderr)
	vars, err := peft.ModulesToSave(layout, []string{"classifier", "score"})
	require.NoError(t, err)
	require.Len(t, vars, 2) // the score head's weights and biases
	require.Contains(t, logged.String(), `["classifier"] match no module of the model and are skipped`)
}

// The pattern key Save writes selects its layer alone under PEFT's rule up to 0.14
// (re.match(rf".*\.{key}$"), else the exact name) and since 0.15 (re.match(rf"(.*\.)?({key})$")).
func TestPEFTPatternKey(t *testing.T) {
	layout := func(paths ...string) *peft.Layout {
		l := &peft.Layout{}
		for _, p := range paths {
			l.Linears = append(l.Linears, &peft.LinearLayer{Path: p})
		}
		return l
	}
	llama := layout("model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.1.mlp.up_proj")
	for _, tc := range []struct {
		layout *peft.Layout
		path   string
		want   string // "" for an error
	}{
		{llama, "model.layers.0.self_attn.q_proj", `layers\.0\.self_attn\.q_proj`},
		{llama, "model.layers.1.mlp.up_proj", `layers\.1\.mlp\.up_proj`},
		{layout("enc.layers.0.q", "dec.layers.0.q"), "enc.layers.0.q", "enc.layers.0.q"}, // found by name up to 0.14
		{layout("x.a.b", "a.b"), "x.a.b", "x.a.b"},
		{layout("x.a.b", "a.b"), "a.b", ""},           // (.*\.)? lets any key for a.b match x.a.b too
		{layout("proj", "layers.0.proj"), "proj", ""}, // likewise
		{layout("proj", "layers.0.proj"), "layers.0.proj", `0\.proj`},
	} {
		key, err := peft.PEFTPatternKey(tc.layout, tc.path)
		if tc.want == "" {
			require.ErrorContains(t, err, "no rank_pattern key selects layer "+tc.path+" alone", tc.path)
			continue
		}
		require.NoError(t, err, tc.path)
		require.Equal(t, tc.want, key, tc.path)
		for _, other := range tc.layout.Linears {
			since := regexp.MustCompile(`^(?:.*\.)?(?:` + key + `)$`).MatchString(other.Path)
			before := regexp.MustCompile(`^.*\.(?:`+key+`)$`).MatchString(other.Path) || key == other.Path
			require.Equal(t, other.Path == tc.path, since, "%s under the rule since 0.15", other.Path)
			require.Equal(t, other.Path == tc.path, before, "%s under the rule up to 0.14", other.Path)
		}
	}
}
