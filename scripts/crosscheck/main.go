// Command crosscheck is the Go half of the cross-check against Hugging Face transformers and PEFT
// (scripts/hf_crosscheck.py is the Python half; it needs transformers, peft and safetensors, which
// the project's GPU machine has):
//
//	go run ./scripts/crosscheck -write OUT     # adapters trained here on stories260K, and their logits
//	python3 scripts/hf_crosscheck.py OUT       # PEFT loads ours and compares; saves adapters of its own
//	go run ./scripts/crosscheck -check OUT     # we load PEFT's and compare with its logits
//
// -write fills OUT/base (the stories260K folder), OUT/go/<case> (one adapter folder per method,
// saved with peft.Model.Save) and OUT/go/expected.json (for each case: the prompt ids and our
// logits [seq × vocab] for them). -check reads OUT/py/<case> and OUT/py/expected.json, written
// by the Python half in the same form, and compares within -tol.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/ia3"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/stories260k"
	"peft/prompttuning"
)

// prompt is "Once upon a time" in stories260K's tokenizer, with <s>.
var prompt = []int{1, 403, 407, 261, 378}

// expected is the content of expected.json: logits by case.
type expected map[string]caseLogits

// caseLogits are one case's prompt and logits.
type caseLogits struct {
	PromptIDs []int     `json:"prompt_ids"`
	Logits    []float32 `json:"logits"` // [len(prompt_ids), vocab], row-major
	Vocab     int       `json:"vocab"`
}

func main() {
	write := flag.String("write", "", "folder to write our adapters, their logits and the base model to")
	check := flag.String("check", "", "folder whose py/ adapters (written by hf_crosscheck.py) to load and compare")
	tol := flag.Float64("tol", 1e-4, "largest absolute logit difference accepted")
	flag.Parse()
	var err error
	switch {
	case *write != "":
		err = writeAll(*write)
	case *check != "":
		err = checkAll(*check, *tol)
	default:
		err = errors.New("give -write OUT or -check OUT")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "crosscheck:", err)
		os.Exit(1)
	}
}

// cases are the methods saved for PEFT to load, each trained a few steps on the golden sequence
// so that every part of the adapter is non-zero.
var cases = map[string]func() (peft.Method, error){
	"lora": func() (peft.Method, error) {
		cfg := lora.DefaultConfig()
		cfg.Rank, cfg.Alpha = 4, 8
		return lora.New(cfg)
	},
	"lora_rslora_patterns": func() (peft.Method, error) {
		cfg := lora.DefaultConfig()
		cfg.Rank, cfg.Alpha, cfg.UseRSLoRA = 4, 16, true
		cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
		cfg.RankPattern = peft.Patterns[int]{{Key: `layers\.0\..*`, Value: 2}, {Key: "down_proj", Value: 6}}
		cfg.AlphaPattern = peft.Patterns[float64]{{Key: "o_proj", Value: 4}}
		return lora.New(cfg)
	},
	"dora": func() (peft.Method, error) {
		cfg := lora.DefaultConfig()
		cfg.Rank, cfg.Alpha, cfg.UseDoRA = 4, 8, true
		cfg.TargetModules = peft.TargetNames("q_proj", "v_proj", "down_proj")
		return lora.New(cfg)
	},
	"ia3": func() (peft.Method, error) {
		cfg := ia3.DefaultConfig()
		cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
		return ia3.New(cfg)
	},
	"adalora": func() (peft.Method, error) {
		cfg := adalora.DefaultConfig()
		cfg.InitRank, cfg.TargetRank, cfg.TotalSteps, cfg.TFinal = 4, 2, 6, 2
		return adalora.New(cfg)
	},
	"prompt_tuning": func() (peft.Method, error) {
		cfg := prompttuning.DefaultConfig()
		cfg.NumVirtualTokens = 4
		return prompttuning.New(cfg)
	},
}

func writeAll(out string) error {
	if err := os.CopyFS(filepath.Join(out, "base"), stories260k.FS()); err != nil {
		return err
	}
	exp := expected{}
	for _, name := range sortedNames() {
		method, err := cases[name]()
		if err != nil {
			return err
		}
		m, err := storiesModel(method)
		if err != nil {
			return err
		}
		if err := train(m); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if err := m.Save(filepath.Join(out, "go", name)); err != nil {
			return err
		}
		logits, vocab, err := promptLogits(m)
		if err != nil {
			return err
		}
		exp[name] = caseLogits{PromptIDs: prompt, Logits: logits, Vocab: vocab}
		fmt.Printf("%-22s saved to %s\n", name, filepath.Join(out, "go", name))
	}
	data, err := json.Marshal(exp)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(out, "go", "expected.json"), data, 0o644)
}

func checkAll(dir string, tol float64) error {
	data, err := os.ReadFile(filepath.Join(dir, "py", "expected.json"))
	if err != nil {
		return err
	}
	var exp expected
	if err := json.Unmarshal(data, &exp); err != nil {
		return err
	}
	names := make([]string, 0, len(exp))
	for name := range exp {
		names = append(names, name)
	}
	sort.Strings(names)
	failed := 0
	for _, name := range names {
		want := exp[name]
		b, err := backend.Get()
		if err != nil {
			return err
		}
		ctx, cfg, err := loadBase()
		if err != nil {
			return err
		}
		m, err := methods.Apply(b, ctx, llama.CausalLM(cfg), filepath.Join(dir, "py", name), []shapes.Shape{shapes.Make(dtypes.Int32, 1, len(prompt))})
		if err != nil {
			fmt.Printf("%-22s FAIL: %v\n", name, err)
			failed++
			continue
		}
		got, _, err := logitsFor(m, want.PromptIDs)
		if err != nil {
			return err
		}
		diff := maxDiff(want.Logits, got)
		merged := ""
		if _, ok := m.Method().(peft.Merger); ok { // merged, the model computes what PEFT's merge does
			if err := m.Merge(); err != nil {
				return err
			}
			gotMerged, _, err := logitsFor(m, want.PromptIDs)
			if err != nil {
				return err
			}
			d := maxDiff(want.Logits, gotMerged)
			merged = fmt.Sprintf(", merged %.3g", d)
			diff = math.Min(diff, d)
		}
		status := "ok"
		if !(diff <= tol) {
			status = "FAIL"
			failed++
		}
		fmt.Printf("%-22s %s: max |logit difference| %.3g%s (method %s)\n", name, status, maxDiff(want.Logits, got), merged, m.Method().Name())
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d cases failed", failed, len(names))
	}
	return nil
}

func sortedNames() []string {
	names := make([]string, 0, len(cases))
	for name := range cases {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

func loadBase() (*context.Context, llama.Config, error) {
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	if err != nil {
		return nil, llama.Config{}, err
	}
	peft.NameBaseModel(ctx, stories260k.Name)
	return ctx, cfg, nil
}

func storiesModel(method peft.Method) (*peft.Model, error) {
	b, err := backend.Get()
	if err != nil {
		return nil, err
	}
	ctx, cfg, err := loadBase()
	if err != nil {
		return nil, err
	}
	return peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, len(prompt)))
}

// train runs 6 steps of next-token training on the golden sequence.
func train(m *peft.Model) error {
	ids, err := stories260k.GoldenSequence()
	if err != nil {
		return err
	}
	in := make([]int32, len(ids))
	for i, id := range ids {
		in[i] = int32(id)
	}
	batch := peft.Batch{
		Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(in, 1, len(in))},
		Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(in, 1, len(in))},
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 6, LearningRate: 3e-2, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	if err != nil {
		return err
	}
	_, err = trainer.Train(peft.NewDataset("golden", []peft.Batch{batch}, true))
	return err
}

func promptLogits(m *peft.Model) ([]float32, int, error) { return logitsFor(m, prompt) }

func logitsFor(m *peft.Model, ids []int) ([]float32, int, error) {
	in := make([]int32, len(ids))
	for i, id := range ids {
		in[i] = int32(id)
	}
	out, err := m.Call(tensors.FromFlatDataAndDimensions(in, 1, len(in)))
	if err != nil {
		return nil, 0, err
	}
	return tensors.MustCopyFlatData[float32](out[0]), out[0].Shape().Dim(-1), nil
}

func maxDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	worst := 0.0
	for i := range a {
		worst = math.Max(worst, math.Abs(float64(a[i])-float64(b[i])))
	}
	return worst
}
