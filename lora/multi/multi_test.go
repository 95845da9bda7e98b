package multi_test

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/ia3"
	"peft/lora"
	"peft/lora/combine"
	"peft/lora/multi"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/peft/stories260k"
)

const seq = 8

var tiny = llama.Tiny()

// loraConfig is an adapter's configuration: rank r and alpha on targets, changed by mutate.
func loraConfig(r int, alpha float64, targets peft.Targets, mutate func(*lora.Config)) lora.Config {
	c := lora.DefaultConfig()
	c.Rank, c.Alpha, c.TargetModules = r, alpha, targets
	if mutate != nil {
		mutate(&c)
	}
	return c
}

// The adapters of the tests: different ranks (rank_pattern included), scales (rsLoRA,
// alpha_pattern) and targets.
var adapters = map[string]lora.Config{
	"a": loraConfig(4, 8, peft.TargetNames("q_proj", "v_proj"), nil),
	"b": loraConfig(2, 4, peft.TargetPattern(peft.AllLinear), func(c *lora.Config) {
		c.UseRSLoRA = true
		c.RankPattern = peft.Patterns[int]{{Key: "down_proj", Value: 6}}
	}),
	"c": loraConfig(8, 16, peft.TargetNames("o_proj", "gate_proj"), func(c *lora.Config) {
		c.AlphaPattern = peft.Patterns[float64]{{Key: "layers.1.mlp.gate_proj", Value: 3}}
	}),
}

// newTinyBase builds the tiny Llama language model with base seed in a fresh context.
func newTinyBase(t testing.TB, seed uint64, method peft.Method, batch int) *peft.Model {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, tiny, 0, seed))
	m, err := peft.NewModel(b, ctx, llama.CausalLM(tiny), method, shapes.Make(dtypes.Int32, batch, seq))
	require.NoError(t, err)
	return m
}

// newServed builds the tiny Llama (base seed 1, pefttest's) with cfg's adapter slots.
func newServed(t testing.TB, cfg multi.Config) *multi.Model {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, tiny, 0, 1))
	m, err := multi.NewModel(b, ctx, llama.CausalLM(tiny), cfg, shapes.Make(dtypes.Int32, 1, seq))
	require.NoError(t, err)
	return m
}

// saveAdapter trains nothing: it draws a LoRA adapter with cfg (B random, seed) on base baseSeed
// and saves it to dir.
func saveAdapter(t testing.TB, dir string, cfg lora.Config, baseSeed, seed uint64) string {
	t.Helper()
	l, err := lora.New(cfg)
	require.NoError(t, err)
	m := newTinyBase(t, baseSeed, l, 1)
	pefttest.SetRandomB(t, m, seed, 0.3)
	require.NoError(t, m.Save(dir))
	return dir
}

// saveAdapters saves every adapter of the table under dir and returns their folders by name.
func saveAdapters(t testing.TB, dir string) map[string]string {
	t.Helper()
	dirs := map[string]string{}
	seed := uint64(10)
	for _, name := range []string{"a", "b", "c"} {
		dirs[name] = saveAdapter(t, filepath.Join(dir, name), adapters[name], 1, seed)
		seed++
	}
	return dirs
}

// rowIDs returns batch rows of seq token ids, different in every row.
func rowIDs(batch, vocab int) [][]int32 {
	ids := make([][]int32, batch)
	for b := range ids {
		ids[b] = make([]int32, seq)
		for i := range ids[b] {
			ids[b][i] = int32((7*b + 3*i*i + b*i + 1) % vocab)
		}
	}
	return ids
}

// maxDiff is the largest absolute difference between x and y (same shape).
func maxDiff(t testing.TB, x, y *tensors.Tensor) float64 {
	t.Helper()
	require.Equal(t, x.Shape().Dimensions, y.Shape().Dimensions)
	a, b := tensors.MustCopyFlatData[float32](x), tensors.MustCopyFlatData[float32](y)
	d := 0.0
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

// row returns row b of a [batch, …] tensor as a [1, …] tensor.
func row(x *tensors.Tensor, b int) *tensors.Tensor {
	dims := x.Shape().Dimensions
	size := x.Shape().Size() / dims[0]
	values := tensors.MustCopyFlatData[float32](x)[b*size : (b+1)*size]
	return tensors.FromFlatDataAndDimensions(values, append([]int{1}, dims[1:]...)...)
}

// referenceRows runs every row of ids through a lora.LoRA model with the row's adapter loaded by
// peft.Model.Load (cfgs and dirs by name), or through the base model for "": each row alone, or
// when inBatch the whole batch, keeping the row (the same batch shape, so the same matmul
// blocking as the mixed batch).
func referenceRows(t testing.TB, newBase func(peft.Method) *peft.Model, cfgs map[string]lora.Config, dirs map[string]string,
	rows []string, ids [][]int32, inBatch ...bool) []*tensors.Tensor {
	t.Helper()
	models := map[string]*peft.Model{}
	out := make([]*tensors.Tensor, len(rows))
	for b, name := range rows {
		m := models[name]
		if m == nil {
			var method peft.Method
			if name != "" {
				l, err := lora.New(cfgs[name])
				require.NoError(t, err)
				method = l
			}
			m = newBase(method)
			if name != "" {
				require.NoError(t, m.Load(dirs[name]))
			}
			models[name] = m
		}
		if len(inBatch) > 0 && inBatch[0] {
			out[b] = row(pefttest.Call(t, m, ids, nil), b)
		} else {
			out[b] = pefttest.Call(t, m, ids[b:b+1], nil)
		}
	}
	return out
}

// checkRows checks that each row of got equals want's row alone within tol, and that the
// adapters' rows differ from the base's (so the check means something).
func checkRows(t testing.TB, got *tensors.Tensor, want []*tensors.Tensor, rows []string, tol float64) float64 {
	t.Helper()
	worst := 0.0
	for b, name := range rows {
		d := maxDiff(t, row(got, b), want[b])
		require.Lessf(t, d, tol, "row %d (adapter %q) differs from its run alone by %g", b, name, d)
		worst = math.Max(worst, d)
	}
	return worst
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		mutate     func(*multi.Config)
	}{
		{"default", "", func(*multi.Config) {}},
		{"slots", "slots must be > 0", func(c *multi.Config) { c.Slots = 0 }},
		{"max_rank", "max_rank must be > 0", func(c *multi.Config) { c.MaxRank = -1 }},
		{"targets", "target_modules", func(c *multi.Config) { c.TargetModules = peft.TargetPattern("(") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := multi.DefaultConfig()
			tc.mutate(&c)
			err := c.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// A batch mixing adapters of different ranks and targets with the base equals, row by row, each
// row run alone through a LoRA model with its adapter loaded or through the base model; Use runs
// one adapter on a whole batch through the peft.Model's own Call as the LoRA model does.
func TestMixedBatchEqualsRowsAlone(t *testing.T) {
	dirs := saveAdapters(t, t.TempDir())
	m := newServed(t, multi.DefaultConfig())
	for _, name := range []string{"a", "b", "c"} {
		require.NoError(t, m.Load(name, dirs[name]))
	}
	require.Equal(t, []string{"a", "b", "c"}, m.Names())
	require.Len(t, m.Targets(), 2*7)

	rows := []string{"a", "b", "", "c", "a", "b", ""}
	ids := rowIDs(len(rows), tiny.VocabSize)
	out, err := m.Call(rows, tensors.FromValue(ids))
	require.NoError(t, err)
	newBase := func(method peft.Method) *peft.Model { return newTinyBase(t, 1, method, 1) }
	want := referenceRows(t, newBase, adapters, dirs, rows, ids)
	worst := checkRows(t, out[0], want, rows, 1e-5)
	for b := range rows[:4] { // each adapter changes the outputs
		if rows[b] != "" {
			require.Greater(t, maxDiff(t, want[b], pefttest.Call(t, newBase(nil), ids[b:b+1], nil)), 1e-2, "adapter %q", rows[b])
		}
	}
	t.Logf("mixed batch of %d rows: largest difference from the rows run alone %.3g", len(rows), worst)

	for _, name := range []string{"b", ""} {
		require.NoError(t, m.Use(name))
		all := make([]string, len(rows))
		for i := range all {
			all[i] = name
		}
		got := pefttest.Call(t, m.PEFT(), ids, nil)
		checkRows(t, got, referenceRows(t, newBase, adapters, dirs, all, ids), all, 1e-5)
	}
}

// An adapter that PEFT itself wrote (no record of this SDK's) loads beside one of ours on
// stories260K, and the mixed batch equals the rows alone.
func TestStoriesPlainPEFTFolder(t *testing.T) {
	dir := t.TempDir()
	cfgs := map[string]lora.Config{
		"plain": loraConfig(4, 8, peft.TargetNames("q_proj", "k_proj", "v_proj", "o_proj"), nil),
		"ours":  loraConfig(2, 2, peft.TargetNames("up_proj", "down_proj"), nil),
	}
	dirs := map[string]string{}
	for i, name := range []string{"plain", "ours"} {
		l, err := lora.New(cfgs[name])
		require.NoError(t, err)
		_, sm := pefttest.StoriesModel(t, l)
		pefttest.SetRandomB(t, sm, uint64(20+i), 0.3)
		dirs[name] = filepath.Join(dir, name)
		require.NoError(t, sm.Save(dirs[name]))
	}
	pefttest.WritePlainPEFT(t, dirs["plain"], filepath.Join(dir, "plain-peft"))
	dirs["plain"] = filepath.Join(dir, "plain-peft")
	saved, err := peft.ReadAdapter(dirs["plain"])
	require.NoError(t, err)
	require.Empty(t, saved.BaseFingerprint, "WritePlainPEFT keeps no record of ours")

	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	mcfg := multi.DefaultConfig()
	mcfg.Slots, mcfg.MaxRank = 2, 4
	m, err := multi.NewModel(b, ctx, llama.CausalLM(cfg), mcfg, shapes.Make(dtypes.Int32, 1, 1))
	require.NoError(t, err)
	for _, name := range []string{"plain", "ours"} {
		require.NoError(t, m.Load(name, dirs[name]))
	}
	rows := []string{"plain", "", "ours", "plain"}
	ids := rowIDs(len(rows), cfg.VocabSize)
	out, err := m.Call(rows, tensors.FromValue(ids))
	require.NoError(t, err)
	newBase := func(method peft.Method) *peft.Model {
		_, sm := pefttest.StoriesModel(t, method)
		return sm
	}
	// Rows alone: batching by itself moves stories260K's logits (up to 15) by up to ~1e-5, the
	// base's rows included, so rows alone agree within 3e-5 and rows of the same batch through
	// the LoRA models within 1e-5.
	alone := checkRows(t, out[0], referenceRows(t, newBase, cfgs, dirs, rows, ids), rows, 3e-5)
	inBatch := checkRows(t, out[0], referenceRows(t, newBase, cfgs, dirs, rows, ids, true), rows, 1e-5)
	t.Logf("stories260K, mixed batch of %d rows: largest difference from the rows alone %.3g, from the rows in the same batch %.3g",
		len(rows), alone, inBatch)
}

// The cached decoding of llama.CausalLMPrefill and CausalLMStep runs one adapter per row through
// CallFn and gives the logits Call gives on the whole sequence.
func TestCallFnCachedDecoding(t *testing.T) {
	dirs := saveAdapters(t, t.TempDir())
	m := newServed(t, multi.DefaultConfig())
	for _, name := range []string{"a", "c"} {
		require.NoError(t, m.Load(name, dirs[name]))
	}
	rows := []string{"c", "", "a"}
	ids := rowIDs(len(rows), tiny.VocabSize) // seq tokens: the prompt is the first seq-1
	prompt, next := make([][]int32, len(rows)), make([][]int32, len(rows))
	for b := range ids {
		prompt[b], next[b] = ids[b][:seq-1], ids[b][seq-1:]
	}
	whole, err := m.Call(rows, tensors.FromValue(ids))
	require.NoError(t, err)
	pre, err := m.CallFn("prefill", llama.CausalLMPrefill(tiny, seq), rows, tensors.FromValue(prompt))
	require.NoError(t, err)
	step, err := m.CallFn("step", llama.CausalLMStep(tiny), rows,
		tensors.FromValue(next), tensors.FromScalar(int32(seq-1)), pre[1], pre[2])
	require.NoError(t, err)
	wantLast := tensors.MustCopyFlatData[float32](whole[0])
	gotLast := tensors.MustCopyFlatData[float32](step[0])
	v := tiny.VocabSize
	worst := 0.0
	for b := range rows {
		for j := range v {
			worst = math.Max(worst, math.Abs(float64(gotLast[b*v+j]-wantLast[(b*seq+seq-1)*v+j])))
		}
	}
	require.Less(t, worst, 1e-5)
	t.Logf("cached decoding with one adapter per row: largest difference from Call %.3g", worst)
}

// Switching (Use, other rows), deleting and loading adapters builds no graph; a new input shape
// does, which shows the count counts.
func TestSwitchingCompilesNothing(t *testing.T) {
	dirs := saveAdapters(t, t.TempDir())
	m := newServed(t, multi.DefaultConfig())
	require.NoError(t, m.Load("a", dirs["a"]))
	require.Equal(t, 0, m.GraphsBuilt())
	ids := tensors.FromValue(rowIDs(3, tiny.VocabSize))
	first, err := m.Call([]string{"a", "", "a"}, ids)
	require.NoError(t, err)
	pefttest.Call(t, m.PEFT(), rowIDs(3, tiny.VocabSize), nil)
	require.Equal(t, 2, m.GraphsBuilt(), "one graph for Call, one for the peft.Model's Call")

	require.NoError(t, m.Load("b", dirs["b"]))
	require.NoError(t, m.Load("c", dirs["c"]))
	for _, step := range []func() error{
		func() error { return m.Use("b") },
		func() error { _, err := m.Call([]string{"c", "b", "a"}, ids); return err },
		func() error { _, err := m.PEFT().Call(ids); return err },
		func() error { return m.Use("") },
		func() error { return m.Delete("a") },
		func() error { _, err := m.Call([]string{"", "b", ""}, ids); return err },
		func() error { return m.Load("a", dirs["a"]) },
		func() error { return m.Use("a") },
		func() error { _, err := m.PEFT().Call(ids); return err },
	} {
		require.NoError(t, step())
	}
	again, err := m.Call([]string{"a", "", "a"}, ids)
	require.NoError(t, err)
	require.Equal(t, 2, m.GraphsBuilt(), "switching, deleting and loading adapters compiled a graph")
	require.Zero(t, maxDiff(t, first[0], again[0]), "a reloaded adapter computes what it did")

	_, err = m.Call([]string{"a", ""}, tensors.FromValue(rowIDs(2, tiny.VocabSize)))
	require.NoError(t, err)
	require.Equal(t, 3, m.GraphsBuilt(), "a new batch size builds a graph")
}

// A deleted adapter's slot is zeroed and taken by the next one; the others are untouched.
func TestSlotReuseAfterDelete(t *testing.T) {
	dirs := saveAdapters(t, t.TempDir())
	cfg := multi.DefaultConfig()
	cfg.Slots = 2
	m := newServed(t, cfg)
	require.NoError(t, m.Load("a", dirs["a"]))
	require.NoError(t, m.Load("b", dirs["b"]))
	require.ErrorContains(t, m.Load("c", dirs["c"]), `no free slot for adapter "c": all 2 hold adapters`)
	require.NoError(t, m.Use("a"))
	require.NoError(t, m.Delete("a"))
	require.Equal(t, []string{"b"}, m.Names())
	ids := rowIDs(3, tiny.VocabSize)
	// Use's adapter is gone: calls without rows run the base, and so does slot 1, now free.
	newBase := func(method peft.Method) *peft.Model { return newTinyBase(t, 1, method, 1) }
	base := referenceRows(t, newBase, adapters, dirs, []string{"", "", ""}, ids)
	checkRows(t, pefttest.Call(t, m.PEFT(), ids, nil), base, []string{"", "", ""}, 1e-5)
	_, err := m.Call([]string{"a", "", ""}, tensors.FromValue(ids))
	require.ErrorContains(t, err, `row 0: no adapter "a" is loaded (loaded: ["b"])`)

	require.NoError(t, m.Load("c", dirs["c"]))
	require.Equal(t, []string{"b", "c"}, m.Names())
	rows := []string{"c", "b", ""}
	out, err := m.Call(rows, tensors.FromValue(ids))
	require.NoError(t, err)
	checkRows(t, out[0], referenceRows(t, newBase, adapters, dirs, rows, ids), rows, 1e-5)
}

// Everything that cannot be served is refused with a message naming the problem, and leaves the
// loaded adapters as they were.
func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	dirs := saveAdapters(t, dir)
	qv := peft.TargetNames("q_proj", "v_proj")
	save := func(name string, cfg lora.Config, baseSeed uint64) string {
		return saveAdapter(t, filepath.Join(dir, name), cfg, baseSeed, 3)
	}
	cfg := multi.DefaultConfig()
	cfg.Slots, cfg.MaxRank, cfg.TargetModules = 3, 4, peft.TargetNames("q_proj", "v_proj", "o_proj")
	m := newServed(t, cfg)
	require.NoError(t, m.Load("a", dirs["a"]))
	ids := tensors.FromValue(rowIDs(2, tiny.VocabSize))
	before, err := m.Call([]string{"a", ""}, ids)
	require.NoError(t, err)

	ia3Method, err := ia3.New(ia3.DefaultConfig())
	require.NoError(t, err)
	ia3Model := newTinyBase(t, 1, ia3Method, 1)
	ia3Dir := filepath.Join(dir, "ia3")
	require.NoError(t, ia3Model.Save(ia3Dir))
	wrongShape := &combine.Adapter{Layers: []combine.Layer{{Path: "model.layers.0.self_attn.q_proj", In: 16, Out: 32, Rank: 2,
		A: make([]float32, 2*16), B: make([]float32, 32*2), Scale: 1}}}

	for _, tc := range []struct {
		name string
		do   func() error
		want string
	}{
		{"unknown row", func() error { _, err := m.Call([]string{"a", "zz"}, ids); return err }, `row 1: no adapter "zz" is loaded (loaded: ["a"])`},
		{"rows for another batch", func() error { _, err := m.Call([]string{"a"}, ids); return err }, "1 row adapters for a batch of 2 rows"},
		{"unknown Use", func() error { return m.Use("zz") }, `Use: no adapter "zz" is loaded`},
		{"unknown Delete", func() error { return m.Delete("zz") }, `Delete: no adapter "zz" is loaded`},
		{"delete the base", func() error { return m.Delete("") }, "the base model"},
		{"empty name", func() error { return m.Load("", dirs["b"]) }, "an adapter needs a name"},
		{"name taken", func() error { return m.Load("a", dirs["a"]) }, `adapter "a" is already loaded`},
		{"rank above max", func() error { return m.Load("r8", save("r8", loraConfig(8, 8, qv, nil), 1)) },
			"layer model.layers.0.self_attn.q_proj has rank 8, the slots hold ranks 1 to 4 (Config.MaxRank)"},
		{"layer not served", func() error { return m.Load("mlp", dirs["c"]) },
			"layer model.layers.0.mlp.gate_proj is not served"},
		{"layer shape", func() error { return m.Add("shape", wrongShape) },
			"layer model.layers.0.self_attn.q_proj is 16×32 (in×out), the model's is 32×32"},
		{"dora", func() error {
			return m.Load("dora", save("dora", loraConfig(2, 2, qv, func(c *lora.Config) { c.UseDoRA = true }), 1))
		}, "use_dora: DoRA adapters cannot be served per row"},
		{"other base", func() error { return m.Load("other", save("other", loraConfig(2, 2, qv, nil), 2)) },
			"trained on another base model"},
		{"modules_to_save", func() error {
			return m.Load("mts", save("mts", loraConfig(2, 2, qv, func(c *lora.Config) { c.ModulesToSave = []string{"lm_head"} }), 1))
		}, `modules_to_save ["lm_head"]`},
		{"not LoRA", func() error { return m.Load("ia3", ia3Dir) }, "peft_type IA3: only LORA adapters"},
		{"no layers", func() error { return m.Add("none", &combine.Adapter{}) }, `adapter "none" has no layers`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.do()
			require.ErrorContains(t, err, tc.want)
			require.Equal(t, []string{"a"}, m.Names())
		})
	}
	err = m.Load("other", filepath.Join(dir, "other"))
	require.True(t, errors.Is(err, peft.ErrOtherBase), "%v", err)
	after, err := m.Call([]string{"a", ""}, ids)
	require.NoError(t, err)
	require.Zero(t, maxDiff(t, before[0], after[0]), "a refused adapter changed the model")
}

// Calls with different rows run concurrently with each other and with Load, Use and Delete of
// another adapter, and every call returns what it returns alone.
func TestConcurrentCalls(t *testing.T) {
	dirs := saveAdapters(t, t.TempDir())
	m := newServed(t, multi.DefaultConfig())
	require.NoError(t, m.Load("a", dirs["a"]))
	require.NoError(t, m.Load("b", dirs["b"]))
	patterns := [][]string{{"a", "b", ""}, {"b", "b", "a"}, {"", "a", ""}, {"b", "", "b"}}
	ids := rowIDs(3, tiny.VocabSize)
	want := make([]*tensors.Tensor, len(patterns))
	for i, rows := range patterns {
		out, err := m.Call(rows, tensors.FromValue(ids))
		require.NoError(t, err)
		want[i] = out[0]
	}
	const goroutines, calls = 4, 8
	errs := make(chan error, goroutines+1)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range calls {
				p := (g + i) % len(patterns)
				out, err := m.Call(patterns[p], tensors.FromValue(ids))
				if err == nil && !slices.Equal(tensors.MustCopyFlatData[float32](out[0]), tensors.MustCopyFlatData[float32](want[p])) {
					err = fmt.Errorf("call %d of goroutine %d (rows %q) differs from the same call alone", i, g, patterns[p])
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() { // a second adapter comes and goes meanwhile
		defer wg.Done()
		for range calls {
			for _, step := range []func() error{
				func() error { return m.Load("c", dirs["c"]) },
				func() error { return m.Use("c") },
				func() error { _, err := m.PEFT().Call(tensors.FromValue(ids)); return err },
				func() error { return m.Delete("c") },
			} {
				if err := step(); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	require.Equal(t, []string{"a", "b"}, m.Names())
}

// benchRows is the benchmark's batch: 8 rows over three adapters and the base.
var benchRows = []string{"a", "b", "c", "", "a", "b", "c", ""}

func benchModel(b *testing.B) (*multi.Model, *tensors.Tensor) {
	dirs := saveAdapters(b, b.TempDir())
	m := newServed(b, multi.DefaultConfig())
	for _, name := range []string{"a", "b", "c"} {
		require.NoError(b, m.Load(name, dirs[name]))
	}
	return m, tensors.FromValue(rowIDs(len(benchRows), tiny.VocabSize))
}

// BenchmarkMixedBatch runs the 8 rows of four adapters in one call.
func BenchmarkMixedBatch(b *testing.B) {
	m, ids := benchModel(b)
	_, err := m.Call(benchRows, ids) // compile outside the timing
	require.NoError(b, err)
	b.ResetTimer()
	for range b.N {
		if _, err := m.Call(benchRows, ids); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOneAdapterAtATime runs the same 8 rows as four calls of 2 rows, one per adapter
// (Use, then the peft.Model's Call): what serving without mixed batches does.
func BenchmarkOneAdapterAtATime(b *testing.B) {
	m, ids := benchModel(b)
	flat := tensors.MustCopyFlatData[int32](ids)
	groups := map[string]*tensors.Tensor{}
	for i, name := range benchRows {
		if groups[name] == nil {
			var rows [][]int32
			for j := i; j < len(benchRows); j++ {
				if benchRows[j] == name {
					rows = append(rows, flat[j*seq:(j+1)*seq])
				}
			}
			groups[name] = tensors.FromValue(rows)
		}
	}
	names := []string{"a", "b", "c", ""}
	run := func() {
		for _, name := range names {
			if err := m.Use(name); err != nil {
				b.Fatal(err)
			}
			if _, err := m.PEFT().Call(groups[name]); err != nil {
				b.Fatal(err)
			}
		}
	}
	run() // compile outside the timing
	b.ResetTimer()
	for range b.N {
		run()
	}
}

// Generation with one adapter per row: generate.GenerateBatchVia through the model's CallFn with
// the rows gives each row exactly the ids generate.Generate gives it on an ordinary model with
// that adapter (or the base) alone, prompts of different lengths in one batch.
func TestGenerateMixedBatch(t *testing.T) {
	dirs := saveAdapters(t, t.TempDir())
	m := newServed(t, multi.DefaultConfig())
	for _, name := range []string{"a", "c"} {
		require.NoError(t, m.Load(name, dirs[name]))
	}
	rows := []string{"a", "", "c", "a"}
	prompts := [][]int{{1, 5, 9}, {1, 7}, {1, 3, 3, 8, 20, 11}, {1}}
	cfgs := make([]generate.Config, len(rows))
	for i := range cfgs {
		cfgs[i] = generate.Config{MaxNewTokens: 6 + i}
	}
	call := func(key string, fn peft.ModelFn, inputs ...*tensors.Tensor) ([]*tensors.Tensor, error) {
		return m.CallFn(key, fn, rows, inputs...)
	}
	got, err := generate.GenerateBatchVia(m.PEFT(), call, prompts, cfgs)
	require.NoError(t, err)
	for i, name := range rows {
		var method peft.Method
		if name != "" {
			l, err := lora.New(adapters[name])
			require.NoError(t, err)
			method = l
		}
		alone := newTinyBase(t, 1, method, 1)
		if name != "" {
			require.NoError(t, alone.Load(dirs[name]))
		}
		want, err := generate.Generate(alone, prompts[i], cfgs[i])
		require.NoError(t, err)
		require.Equal(t, want, got[i], "row %d (%q)", i, name)
	}
	base, err := generate.Generate(newTinyBase(t, 1, nil, 1), prompts[0], cfgs[0])
	require.NoError(t, err)
	require.NotEqual(t, base, got[0], "adapter a changes the text (else the check proves little)")
}
