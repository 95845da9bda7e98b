package methods_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"log"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"
	"github.com/x448/float16"

	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/peft/safetensors"
	"peft/prompttuning"
)

// peftFolder is an adapter folder laid out by hand to Hugging Face PEFT's documented semantics,
// as PEFT's save_pretrained writes it (no record of ours in the metadata).
type peftFolder struct {
	config  map[string]any
	tensors []safetensors.Tensor
}

func (f peftFolder) write(t *testing.T, dir string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	data, err := json.MarshalIndent(f.config, "", "  ")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterConfigFile), data, 0o644))
	weights, err := safetensors.Encode(f.tensors, map[string]string{"format": "pt"})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterWeightsFile), weights, 0o644))
}

// tensor encodes values in dtype (F32, F16 or BF16) and returns the tensor and the values as the
// file holds them (rounded to dtype), for the reference computation.
func tensor(t *testing.T, name string, dtype safetensors.DType, dims []int, values []float32) (safetensors.Tensor, []float32) {
	t.Helper()
	st := safetensors.FromFloat32(name, dims, values)
	if dtype != safetensors.F32 {
		st.DType = dtype
		st.Data = make([]byte, 2*len(values))
		for i, v := range values {
			bits := uint16(math.Float32bits(v) >> 16) // BF16: truncation
			if dtype == safetensors.F16 {
				bits = float16.Fromfloat32(v).Bits()
			}
			binary.LittleEndian.PutUint16(st.Data[2*i:], bits)
		}
	}
	held, err := st.Float32s()
	require.NoError(t, err)
	return st, held
}

// tinyLinears are the tiny Llama's linear layers (besides the head) with their [in, out] sizes.
func tinyLinears() map[string][2]int {
	cfg := pefttest.Config()
	d, kv, ff := cfg.HiddenSize, cfg.NumKVHeads*cfg.HeadDim(), cfg.IntermediateSize
	out := map[string][2]int{}
	for l := range cfg.NumLayers {
		p := "model.layers." + string(rune('0'+l)) + "."
		for name, io := range map[string][2]int{
			"self_attn.q_proj": {d, d}, "self_attn.k_proj": {d, kv}, "self_attn.v_proj": {d, kv},
			"self_attn.o_proj": {d, d}, "mlp.gate_proj": {d, ff}, "mlp.up_proj": {d, ff}, "mlp.down_proj": {ff, d},
		} {
			out[p+name] = io
		}
	}
	return out
}

// addToWeights adds delta ([out, in], PyTorch's layout) to the [in, out] weights of layer path
// in m: the reference computation of a merged adapter, written independently of the SDK's merge.
func addToWeights(t *testing.T, m *peft.Model, path string, delta []float32, in, out int) {
	t.Helper()
	w := m.Context().GetVariableByScopeAndName("/"+strings.ReplaceAll(path, ".", "/")+"/dense", "weights")
	require.NotNil(t, w, path)
	values, err := peft.Float32s(w)
	require.NoError(t, err)
	for i := range in {
		for o := range out {
			values[i*out+o] += delta[o*in+i]
		}
	}
	require.NoError(t, peft.SetFloat32s(w, values))
}

// loraDelta is s·B·A for A [r, in] and B [out, r], as PEFT's LoRA computes it: [out, in].
func loraDelta(a, b []float32, r, in, out int, s float64) []float32 {
	delta := make([]float32, out*in)
	for o := range out {
		for i := range in {
			var sum float64
			for k := range r {
				sum += float64(b[o*r+k]) * float64(a[k*in+i])
			}
			delta[o*in+i] = float32(s * sum)
		}
	}
	return delta
}

func requireLogitsClose(t *testing.T, want, got [][]float32, tol float64) {
	t.Helper()
	require.Equal(t, len(want), len(got))
	worst := 0.0
	for i := range want {
		require.InDeltaSlice(t, want[i], got[i], tol, "row %d", i)
		for j := range want[i] {
			worst = math.Max(worst, math.Abs(float64(want[i][j]-got[i][j])))
		}
	}
	t.Logf("max |logit difference| %.3g", worst)
}

// A LoRA folder laid out by hand as PEFT writes it loads here (in any float dtype, with list or
// regex targets, rsLoRA, rank and alpha patterns resolved first-key-in-file-order, modules to
// save, in the folder or a sub-folder) and gives the logits of the base model with W + s·B·A
// computed on the host.
func TestLoadHandLaidLoRA(t *testing.T) {
	layers := tinyLinears()
	for _, tc := range []struct {
		name    string
		dtype   safetensors.DType
		config  map[string]any
		targets []string
		// rank and scale of each target, as PEFT would resolve them.
		rank  func(path string) int
		scale func(path string) float64
		head  bool   // modules_to_save: ["score"]
		sub   string // saved in this sub-folder
	}{
		{
			name: "list targets, F32", dtype: safetensors.F32,
			config:  map[string]any{"r": 4, "lora_alpha": 16, "target_modules": []string{"v_proj", "q_proj"}},
			targets: []string{"self_attn.q_proj", "self_attn.v_proj"},
			rank:    func(string) int { return 4 }, scale: func(string) float64 { return 16.0 / 4 },
		},
		{
			name: "rsLoRA, default targets, F16", dtype: safetensors.F16,
			config:  map[string]any{"r": 4, "lora_alpha": 6, "use_rslora": true, "target_modules": nil},
			targets: []string{"self_attn.q_proj", "self_attn.v_proj"},
			rank:    func(string) int { return 4 }, scale: func(string) float64 { return 6.0 / 2 },
		},
		{
			name: "regex targets, rank and alpha patterns in file order, BF16", dtype: safetensors.BF16,
			config: map[string]any{"r": 4, "lora_alpha": 8, "target_modules": `.*\.(k_proj|o_proj)`,
				// json.RawMessage keeps this key order: layers\.1\..* comes first, so it wins on
				// model.layers.1.self_attn.k_proj over k_proj.
				"rank_pattern":  json.RawMessage(`{"layers\\.1\\..*": 2, "k_proj": 3}`),
				"alpha_pattern": json.RawMessage(`{"o_proj": 32}`)},
			targets: []string{"self_attn.k_proj", "self_attn.o_proj"},
			rank: func(p string) int {
				switch {
				case strings.HasPrefix(p, "model.layers.1."):
					return 2
				case strings.HasSuffix(p, "k_proj"):
					return 3
				}
				return 4
			},
			scale: func(p string) float64 {
				r := 4.0 // o_proj in layer 0
				switch {
				case strings.HasPrefix(p, "model.layers.1."):
					r = 2
				case strings.HasSuffix(p, "k_proj"):
					r = 3
				}
				if strings.HasSuffix(p, "o_proj") {
					return 32 / r
				}
				return 8 / r
			},
		},
		{
			name: "all-linear with a new head, in a sub-folder", dtype: safetensors.F32,
			// PEFT's sequence classifiers save both names; only "score" exists in a Llama.
			config:  map[string]any{"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "modules_to_save": []string{"classifier", "score"}},
			targets: []string{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
			rank:    func(string) int { return 2 }, scale: func(string) float64 { return 2 },
			head: true, sub: "my-task",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reference := pefttest.NewModel(t, nil)
			rng := peft.NewRand(11)
			folder := peftFolder{config: map[string]any{"peft_type": "LORA", "task_type": "SEQ_CLS",
				"base_model_name_or_path": "tiny", "inference_mode": true, "bias": "none", "use_dora": false}}
			for k, v := range tc.config {
				folder.config[k] = v
			}
			for _, path := range slices.Sorted(maps.Keys(layers)) { // one RNG order every run
				io := layers[path]
				adapted := false
				for _, suffix := range tc.targets {
					adapted = adapted || strings.HasSuffix(path, "."+suffix)
				}
				if !adapted {
					continue
				}
				r, in, out := tc.rank(path), io[0], io[1]
				a, heldA := tensor(t, peft.PEFTPrefix+path+".lora_A.weight", tc.dtype, []int{r, in}, peft.Normal(rng, r*in, 0.3))
				b, heldB := tensor(t, peft.PEFTPrefix+path+".lora_B.weight", tc.dtype, []int{out, r}, peft.Normal(rng, out*r, 0.3))
				folder.tensors = append(folder.tensors, a, b)
				addToWeights(t, reference, path, loraDelta(heldA, heldB, r, in, out, tc.scale(path)), in, out)
			}
			if tc.head {
				head, held := tensor(t, peft.PEFTPrefix+"score.weight", tc.dtype, []int{2, 32}, peft.Normal(rng, 64, 0.5))
				folder.tensors = append(folder.tensors, head)
				w := reference.Context().GetVariableByScopeAndName("/score/dense", "weights")
				require.NoError(t, peft.SetFloat32s(w, peft.Transpose(held, 2, 32)))
			}
			dir := t.TempDir()
			folder.write(t, filepath.Join(dir, tc.sub))

			m := applyFolder(t, dir)
			require.Equal(t, "lora", m.Method().Name())
			// Unmerged x·W + s·(x·A)·B against the host's merged W + s·B·A: float32 rounding only.
			requireLogitsClose(t, pefttest.Logits(t, reference), pefttest.Logits(t, m), 1e-4)
			// The merged weights are the host's W + s·B·A too.
			require.NoError(t, m.Merge())
			for path := range layers {
				want, err := peft.Float32s(reference.Context().GetVariableByScopeAndName("/"+strings.ReplaceAll(path, ".", "/")+"/dense", "weights"))
				require.NoError(t, err)
				got, err := peft.Float32s(m.Context().GetVariableByScopeAndName("/"+strings.ReplaceAll(path, ".", "/")+"/dense", "weights"))
				require.NoError(t, err)
				require.InDeltaSlice(t, want, got, 1e-6, path)
			}
		})
	}
}

// applyFolder builds the method saved in dir and applies it to the tiny Llama classifier.
func applyFolder(t testing.TB, dir string, opts ...peft.LoadOption) *peft.Model {
	t.Helper()
	m, err := applyFolderErr(t, dir, opts...)
	require.NoError(t, err)
	return m
}

func applyFolderErr(t testing.TB, dir string, opts ...peft.LoadOption) (*peft.Model, error) {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, pefttest.Config(), 2, 1))
	return methods.Apply(b, ctx, llama.Classifier(pefttest.Config(), 2), dir,
		[]shapes.Shape{shapes.Make(dtypes.Int32, pefttest.Batch, pefttest.Seq)}, opts...)
}

// An AdaLoRA folder with a rank pattern (tensors cut to the kept singular values, as PEFT's
// resize_state_dict_by_rank_pattern saves them) gives the base with W + α/(init_r + 1e-5)·
// B·diag(E)·A computed on the host.
func TestLoadHandLaidAdaLoRA(t *testing.T) {
	const initR, alpha = 4, 6.0
	kept := map[string][]bool{
		"model.layers.0.self_attn.q_proj": {true, false, true, true},
		"model.layers.1.self_attn.v_proj": {false, false, false, false},
		// model.layers.1.self_attn.q_proj and model.layers.0.self_attn.v_proj: no entry, all kept.
	}
	pattern := map[string][]bool{}
	for p, k := range kept {
		pattern[p+".lora_E"] = k
	}
	folder := peftFolder{config: map[string]any{"peft_type": "ADALORA", "task_type": "SEQ_CLS", "init_r": initR,
		"target_r": 2, "lora_alpha": alpha, "total_step": 100, "target_modules": []string{"q_proj", "v_proj"},
		"rank_pattern": pattern, "r": 8, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}}
	reference := pefttest.NewModel(t, nil)
	rng := peft.NewRand(5)
	linears := tinyLinears()
	for _, path := range slices.Sorted(maps.Keys(linears)) {
		io := linears[path]
		if !strings.HasSuffix(path, "q_proj") && !strings.HasSuffix(path, "v_proj") {
			continue
		}
		in, out := io[0], io[1]
		n := initR
		if k := kept[path]; k != nil {
			n = 0
			for _, x := range k {
				if x {
					n++
				}
			}
		}
		a, heldA := tensor(t, peft.PEFTPrefix+path+".lora_A", safetensors.F32, []int{n, in}, peft.Normal(rng, n*in, 0.3))
		e, heldE := tensor(t, peft.PEFTPrefix+path+".lora_E", safetensors.F32, []int{n, 1}, peft.Normal(rng, n, 1))
		b, heldB := tensor(t, peft.PEFTPrefix+path+".lora_B", safetensors.F32, []int{out, n}, peft.Normal(rng, out*n, 0.3))
		folder.tensors = append(folder.tensors, a, e, b)
		scaledA := make([]float32, len(heldA)) // (A∘E)
		for k := range n {
			for i := range in {
				scaledA[k*in+i] = heldA[k*in+i] * heldE[k]
			}
		}
		addToWeights(t, reference, path, loraDelta(scaledA, heldB, n, in, out, alpha/(initR+1e-5)), in, out)
	}
	dir := t.TempDir()
	folder.write(t, dir)
	m := applyFolder(t, dir)
	a, ok := m.Method().(*adalora.AdaLoRA)
	require.True(t, ok)
	requireLogitsClose(t, pefttest.Logits(t, reference), pefttest.Logits(t, m), 1e-4)
	require.Equal(t, map[string]int{
		"model.layers.0.self_attn.q_proj": 3, "model.layers.0.self_attn.v_proj": 4,
		"model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 0,
	}, a.RankPattern())

	// Saved again, the folder has the same rank pattern and cut tensors.
	again := t.TempDir()
	require.NoError(t, m.Save(again))
	fields, err := peft.ReadPEFTFields(again)
	require.NoError(t, err)
	var back map[string][]bool
	require.NoError(t, fields.Get("rank_pattern", &back))
	require.Equal(t, map[string][]bool{
		"model.layers.0.self_attn.q_proj.lora_E": kept["model.layers.0.self_attn.q_proj"],
		"model.layers.0.self_attn.v_proj.lora_E": {true, true, true, true},
		"model.layers.1.self_attn.q_proj.lora_E": {true, true, true, true},
		"model.layers.1.self_attn.v_proj.lora_E": kept["model.layers.1.self_attn.v_proj"],
	}, back)
	file, err := safetensors.Read(filepath.Join(again, peft.AdapterWeightsFile))
	require.NoError(t, err)
	st, _ := file.Get(peft.PEFTPrefix + "model.layers.0.self_attn.q_proj.lora_B")
	require.Equal(t, []int{32, 3}, st.Shape)
	st, _ = file.Get(peft.PEFTPrefix + "model.layers.1.self_attn.v_proj.lora_A")
	require.Equal(t, []int{0, 32}, st.Shape)
	requireLogitsClose(t, pefttest.Logits(t, m), pefttest.Logits(t, applyFolder(t, again)), 0)
}

// A prompt-tuning folder as PEFT writes it (prompt_embeddings without prefix) loads, and what we
// save has PEFT's concrete fields.
func TestPromptTuningPEFTLayout(t *testing.T) {
	cfg := prompttuning.DefaultConfig()
	cfg.NumVirtualTokens = 3
	p, err := prompttuning.New(cfg)
	require.NoError(t, err)
	m := pefttest.NewModel(t, p)
	pefttest.Train(t, m, 3, 1e-2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	fields, err := peft.ReadPEFTFields(dir)
	require.NoError(t, err)
	want := map[string]any{"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 3.0,
		"token_dim": 32.0, "num_transformer_submodules": 1.0, "num_attention_heads": 4.0, "num_layers": 2.0,
		"prompt_tuning_init": "RANDOM", "inference_mode": true}
	for key, value := range want {
		var got any
		require.NoError(t, fields.Get(key, &got))
		require.Equal(t, value, got, key)
	}
	file, err := safetensors.Read(filepath.Join(dir, peft.AdapterWeightsFile))
	require.NoError(t, err)
	require.Len(t, file.Tensors, 1)
	require.Equal(t, "prompt_embeddings", file.Tensors[0].Name)
	require.Equal(t, []int{3, 32}, file.Tensors[0].Shape)

	// The same tensors in a folder without our record (as PEFT writes it) load to the same model.
	plain := t.TempDir()
	folder := peftFolder{config: map[string]any{"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS",
		"num_virtual_tokens": 3, "token_dim": 32, "num_transformer_submodules": 1, "prompt_tuning_init": "TEXT",
		"prompt_tuning_init_text": "Classify:", "tokenizer_name_or_path": "tiny"},
		tensors: []safetensors.Tensor{file.Tensors[0]}}
	folder.write(t, plain)
	requireLogitsClose(t, pefttest.Logits(t, m), pefttest.Logits(t, applyFolder(t, plain)), 0)
}

// Bad folders give an error naming the problem, and loading one changes nothing.
func TestBadPEFTFolders(t *testing.T) {
	good := func() peftFolder {
		rng := peft.NewRand(3)
		f := peftFolder{config: map[string]any{"peft_type": "LORA", "r": 2, "lora_alpha": 4,
			"target_modules": []string{"q_proj"}}}
		for _, l := range []string{"0", "1"} {
			p := peft.PEFTPrefix + "model.layers." + l + ".self_attn.q_proj"
			a, _ := tensor(t, p+".lora_A.weight", safetensors.F32, []int{2, 32}, peft.Normal(rng, 64, 0.1))
			b, _ := tensor(t, p+".lora_B.weight", safetensors.F32, []int{32, 2}, peft.Normal(rng, 64, 0.1))
			f.tensors = append(f.tensors, a, b)
		}
		return f
	}
	dir := t.TempDir()
	good().write(t, dir)
	m := applyFolder(t, dir)
	before := pefttest.Logits(t, m)

	for _, tc := range []struct {
		name  string
		edit  func(f *peftFolder) // before writing
		files func(dir string)    // after writing
		want  string
	}{
		{"no tensors", nil, func(d string) { require.NoError(t, os.Remove(filepath.Join(d, peft.AdapterWeightsFile))) },
			"adapter_model.safetensors is missing"},
		{"pickle only", nil, func(d string) {
			require.NoError(t, os.Rename(filepath.Join(d, peft.AdapterWeightsFile), filepath.Join(d, "adapter_model.bin")))
		}, "Python pickle"},
		{"truncated tensors", nil, func(d string) {
			path := filepath.Join(d, peft.AdapterWeightsFile)
			data, err := os.ReadFile(path)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(path, data[:len(data)-10], 0o644))
		}, "safetensors"},
		{"key with a typo", func(f *peftFolder) {
			f.tensors[0].Name = strings.Replace(f.tensors[0].Name, "lora_A", "lora_a", 1)
		}, nil, "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is missing"},
		{"adapter name in the key", func(f *peftFolder) {
			f.tensors[1].Name = strings.Replace(f.tensors[1].Name, "lora_B.weight", "lora_B.default.weight", 1)
		}, nil, "lora_B.weight is missing"},
		{"unexpected tensor", func(f *peftFolder) {
			extra := f.tensors[0]
			extra.Name = peft.PEFTPrefix + "model.layers.0.self_attn.k_proj.lora_A.weight"
			f.tensors = append(f.tensors, extra)
		}, nil, "has tensors the model's lora adapter does not have"},
		{"wrong shape", func(f *peftFolder) {
			f.tensors[2], _ = tensor(t, f.tensors[2].Name, safetensors.F32, []int{2, 16}, make([]float32, 32))
		}, nil, "lora_A.weight has shape [2 16]"},
		{"unknown peft_type", func(f *peftFolder) { f.config["peft_type"] = "BOFT" }, nil, `peft_type "BOFT" is not supported`},
		{"no peft_type", func(f *peftFolder) { delete(f.config, "peft_type") }, nil, "peft_type is required"},
		{"DoRA without its magnitudes", func(f *peftFolder) { f.config["use_dora"] = true }, nil, "q_proj.lora_magnitude_vector is missing"},
		{"layers_to_transform", func(f *peftFolder) { f.config["layers_to_transform"] = []int{0} }, nil, `"layers_to_transform"`},
		{"lora_bias", func(f *peftFolder) { f.config["lora_bias"] = true }, nil, `"lora_bias"`},
		{"trainable tokens", func(f *peftFolder) { f.config["trainable_token_indices"] = []int{1, 2} }, nil, `"trainable_token_indices"`},
		{"PiSSA", func(f *peftFolder) { f.config["init_lora_weights"] = "pissa" }, nil, `"init_lora_weights" = pissa`},
		{"wrong type", func(f *peftFolder) { f.config["r"] = "two" }, nil, `field "r"`},
		{"bad target regex", func(f *peftFolder) { f.config["target_modules"] = "q_proj(" }, nil, "not a valid regular expression"},
		{"target matching nothing", func(f *peftFolder) { f.config["target_modules"] = []string{"c_attn"} }, nil, "match no linear layer"},
		{"AdaLoRA without total_step", func(f *peftFolder) {
			f.config["peft_type"], f.config["total_step"] = "ADALORA", 0
		}, nil, "total_step"},
		{"another task", func(f *peftFolder) { f.config["task_type"] = "CAUSAL_LM" }, nil, "task_type CAUSAL_LM, the model is SEQ_CLS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "adapter")
			f := good()
			if tc.edit != nil {
				tc.edit(&f)
			}
			f.write(t, bad)
			if tc.files != nil {
				tc.files(bad)
			}
			// Building a model from the folder fails naming the problem; loading it into the
			// model built from the good folder fails too.
			_, errApply := applyFolderErr(t, bad)
			require.ErrorContains(t, errApply, tc.want)
			t.Log(errApply)
			require.Error(t, m.Load(bad))
			require.Equal(t, before, pefttest.Logits(t, m), "a failed load changed the model")
		})
	}

	// Fields we do not know are ignored with one log line.
	unknown := t.TempDir()
	f := good()
	f.config["some_future_option"] = 3
	f.write(t, unknown)
	var logged bytes.Buffer
	log.SetOutput(&logged)
	defer log.SetOutput(os.Stderr)
	require.NoError(t, m.Load(unknown))
	require.Contains(t, logged.String(), "ignored fields this SDK does not know: [some_future_option]")
	require.Equal(t, 1, strings.Count(logged.String(), "\n"))
}

// A saved LoRA folder is what PEFT writes: base_model.model.<path>.lora_A.weight [r, in] and
// .lora_B.weight [out, r] in PyTorch's layout, no adapter name in any key, metadata format pt;
// Delta equals s·B·A computed from the file.
func TestSavedLoRATensors(t *testing.T) {
	cfg := lora.DefaultConfig()
	cfg.Rank, cfg.Alpha = 4, 12
	l, err := lora.New(cfg)
	require.NoError(t, err)
	m := pefttest.NewModel(t, l)
	pefttest.Train(t, m, 3, 1e-2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	file, err := safetensors.Read(filepath.Join(dir, peft.AdapterWeightsFile))
	require.NoError(t, err)
	require.Equal(t, "pt", file.Metadata["format"])
	var names []string
	for _, st := range file.Tensors {
		names = append(names, st.Name)
		require.NotContains(t, st.Name, ".default.")
	}
	require.ElementsMatch(t, []string{
		"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
		"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
		"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
		"base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
	}, names)
	for path, io := range tinyLinears() {
		if l.Rank(path) == 0 {
			continue
		}
		a, _ := file.Get(peft.PEFTPrefix + path + ".lora_A.weight")
		b, _ := file.Get(peft.PEFTPrefix + path + ".lora_B.weight")
		require.Equal(t, []int{4, io[0]}, a.Shape)
		require.Equal(t, []int{io[1], 4}, b.Shape)
		av, err := a.Float32s()
		require.NoError(t, err)
		bv, err := b.Float32s()
		require.NoError(t, err)
		delta, err := l.Delta(path) // [in, out]
		require.NoError(t, err)
		want := loraDelta(av, bv, 4, io[0], io[1], 3)
		require.InDeltaSlice(t, peft.Transpose(want, io[1], io[0]), delta, 1e-6, path)
	}
}

// A folder in this SDK's earlier layout (peft_config.json and GoMLX-named tensors) still loads.
func TestLoadLegacyLayout(t *testing.T) {
	l, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	m := pefttest.NewModel(t, l)
	pefttest.Train(t, m, 3, 1e-2)
	var out []safetensors.Tensor
	for _, v := range l.State(m.Context()) {
		value, err := v.Value()
		require.NoError(t, err)
		st, err := safetensors.FromGoMLX(v.ScopeAndName(), value)
		require.NoError(t, err)
		out = append(out, st)
	}
	state, err := safetensors.Encode(out, map[string]string{"method": "lora"})
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.StateFile), state, 0o644))
	cfgJSON, err := json.Marshal(l.Config())
	require.NoError(t, err)
	saved, err := json.Marshal(map[string]any{"format_version": 1, "method": "lora", "config": json.RawMessage(cfgJSON),
		"tensors": len(out), "state_sha256": sha256Hex(state)})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.ConfigFile), saved, 0o644))
	requireLogitsClose(t, pefttest.Logits(t, m), pefttest.Logits(t, applyFolder(t, dir)), 0)
}

func sha256Hex(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// A named pipe where a file should be is refused before anything opens it (opening one blocks).
func TestFolderWithAPipe(t *testing.T) {
	for _, name := range []string{peft.AdapterConfigFile, peft.AdapterWeightsFile} {
		dir := t.TempDir()
		writeFolder(t, dir, map[string]any{"peft_type": "LORA", "r": 2, "target_modules": []string{"q_proj"}}, nil)
		require.NoError(t, os.Remove(filepath.Join(dir, name)))
		require.NoError(t, syscall.Mkfifo(filepath.Join(dir, name), 0o644))
		_, err := methods.FromFolder(dir)
		require.ErrorContains(t, err, "is not a regular file", name)
	}
}
