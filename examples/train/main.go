// Command train fine-tunes a model on your own JSONL data and writes the result:
//
//	go run ./examples/train -data examples/train/testdata -method lora -steps 300 -lr 1e-2 -seq 64 -out runs/colours
//	go run ./examples/train -model DIR -data PATH -method NAME -steps N -out DIR [-batch B] [-seq T]
//	    [-lr X] [-grad-accum K] [-eval-every N] [-save-every N] [-patience P] [-patience-threshold D] [-seed S] [-resume] [-json]
//
// -model is a Hugging Face model folder (default: the embedded stories260K). -data is a folder
// with train.jsonl and valid.jsonl, or one .jsonl file of which -valid-share is held out for
// validation (its last lines). Lines are {"text"}, {"prompt", "completion"} or {"messages"} (the
// model's chat template formats them); package peft/data says how each is tokenized and which
// tokens the loss covers. -method is lora, qlora, adalora, adapter, prompt-tuning or full;
// -rank, -alpha, -dropout and -targets set LoRA, QLoRA and AdaLoRA, -virtual-tokens prompt
// tuning (the packages' defaults otherwise). Run go run ./examples/train -h for every flag.
//
// DIR receives the result: for LoRA, QLoRA, AdaLoRA and prompt tuning the adapter in Hugging
// Face PEFT's layout (adapter_config.json and adapter_model.safetensors, for examples/generate
// -adapter, examples/merge, PEFT, vLLM); for full fine-tuning a Hugging Face model folder
// (config.json, model.safetensors: examples/generate -model DIR runs it); for bottleneck
// adapters this SDK's layout (peft_config.json, peft_state.safetensors). Beside it: the model's
// tokenizer files, best/ (the result at the best validation loss; after an early stop DIR holds
// that one too), checkpoint-N/ every -save-every steps and at the end, the newest
// -keep-checkpoints of them kept (Hugging Face Trainer's convention), loss.png and log.jsonl (one
// JSON object per validation). The learning rate warms up over -warmup steps and decays linearly
// to 0 at -steps.
//
// A new run into a DIR that holds one is refused; -resume continues it from its
// highest-numbered complete checkpoint to -steps: a run killed at any moment and resumed with the
// same command line ends with the same result, tensor for tensor, as one never interrupted. A
// checkpoint made with another model, method, data or settings is refused with an error naming
// the flags that differ. One process at a time may use a DIR (a lock file).
//
// With -json the last line of stdout is one JSON object: method, steps (those run),
// trainable_params, train_loss_first, train_loss_last, valid_loss_before, valid_loss_after,
// best_valid_loss, best_step, stopped_early, forgetting_before and forgetting_after (with
// -forgetting), resumed_from, seconds (over every process of the run), out.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"golang.org/x/term"

	"peft/adapter"
	"peft/full"
	"peft/ia3"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/atomicfile"
	"peft/peft/backend"
	"peft/peft/chat"
	"peft/peft/data"
	"peft/peft/llama"
	"peft/peft/plot"
	"peft/peft/stories260k"
	"peft/peft/tokenizer"
	"peft/prefixtuning"
	"peft/prompttuning"
	"peft/qlora"
)

// options are the command line's.
type options struct {
	Model, Data, Method, Out  string
	Steps, Batch, Seq, Warmup int
	LR                        float64
	GradAccum                 int
	EvalEvery, SaveEvery      int
	Patience                  int
	PatienceThreshold         float64
	Seed                      int64
	Pack                      bool
	ValidShare                float64
	Rank                      int
	Alpha, Dropout            float64
	DoRA                      bool
	Targets                   string
	VirtualTokens             int
	PrefixProjection          bool
	Forgetting                string
	KeepCheckpoints           int
	Resume, JSON              bool
	output                    io.Writer // where progress lines go (stdout)
}

// result is the -json output.
type result struct {
	Method           string   `json:"method"`
	Steps            int      `json:"steps"`
	TrainableParams  int64    `json:"trainable_params"`
	TrainLossFirst   float64  `json:"train_loss_first"`
	TrainLossLast    float64  `json:"train_loss_last"`
	ValidLossBefore  float64  `json:"valid_loss_before"`
	ValidLossAfter   float64  `json:"valid_loss_after"`
	BestValidLoss    float64  `json:"best_valid_loss"`
	BestStep         int      `json:"best_step"`
	StoppedEarly     bool     `json:"stopped_early"`
	ForgettingBefore *float64 `json:"forgetting_before,omitempty"`
	ForgettingAfter  *float64 `json:"forgetting_after,omitempty"`
	ResumedFrom      int      `json:"resumed_from"`
	Seconds          float64  `json:"seconds"`
	Out              string   `json:"out"`
}

func main() {
	var o options
	flag.StringVar(&o.Model, "model", "", "Hugging Face model folder (default: the embedded stories260K)")
	flag.StringVar(&o.Data, "data", "", "folder with train.jsonl and valid.jsonl, or one .jsonl file")
	flag.StringVar(&o.Method, "method", "lora", "lora, qlora, adalora, ia3, adapter, prompt-tuning, prefix-tuning or full")
	flag.StringVar(&o.Out, "out", "", "folder for the adapter, checkpoints, loss.png and log.jsonl")
	flag.IntVar(&o.Steps, "steps", 100, "optimizer steps of the run (the schedule decays over them)")
	flag.IntVar(&o.Batch, "batch", 4, "rows per batch")
	flag.IntVar(&o.Seq, "seq", 128, "tokens per row (longer examples are cut, see peft/data)")
	flag.Float64Var(&o.LR, "lr", 0, "peak learning rate (default: the method's, 2e-4 for LoRA, QLoRA and AdaLoRA, 3e-3 IA3, 1e-3 adapter, 3e-2 prompt tuning, 1e-2 prefix tuning, 2e-5 full)")
	flag.IntVar(&o.Warmup, "warmup", -1, "warmup steps (-1: a tenth of -steps)")
	flag.IntVar(&o.GradAccum, "grad-accum", 1, "batches per optimizer step")
	flag.IntVar(&o.EvalEvery, "eval-every", 0, "steps between validations (default: a tenth of -steps)")
	flag.IntVar(&o.SaveEvery, "save-every", 0, "steps between checkpoints (default: -eval-every)")
	flag.IntVar(&o.KeepCheckpoints, "keep-checkpoints", 3, "checkpoint-N folders kept, the newest (0: all)")
	flag.IntVar(&o.Patience, "patience", 0, "stop after this many validations without improvement (0: never)")
	flag.Float64Var(&o.PatienceThreshold, "patience-threshold", 0, "a validation loss improves only when it is below the best by more than this (Hugging Face's early_stopping_threshold)")
	flag.Int64Var(&o.Seed, "seed", 0, "seed of the data order, the method's initialization and dropout")
	flag.BoolVar(&o.Pack, "pack", false, "lay several short examples in one row (they then see each other, see peft/data)")
	flag.Float64Var(&o.ValidShare, "valid-share", 0.1, "share of a single -data file held out for validation")
	flag.IntVar(&o.Rank, "rank", 8, "LoRA/QLoRA rank; AdaLoRA's target rank (it starts at 1.5×)")
	flag.Float64Var(&o.Alpha, "alpha", 0, "LoRA alpha (default: the rank)")
	flag.Float64Var(&o.Dropout, "dropout", 0, "LoRA dropout")
	flag.BoolVar(&o.DoRA, "dora", false, "with lora or qlora: DoRA (a trained magnitude per output column, Hugging Face PEFT's use_dora)")
	flag.StringVar(&o.Targets, "targets", "", "comma-separated layer names to adapt, or all-linear (default: q_proj,v_proj; ia3: k_proj,v_proj,down_proj, down_proj scaled on its input whenever targeted)")
	flag.IntVar(&o.VirtualTokens, "virtual-tokens", 20, "prompt and prefix tuning's virtual tokens")
	flag.BoolVar(&o.PrefixProjection, "prefix-projection", true, "prefix tuning through PEFT's reparameterization MLP (a plain prefix starts from N(0, 1), far from the model)")
	flag.StringVar(&o.Forgetting, "forgetting", "", "JSONL of general text whose loss is reported before and after (what the fine-tune cost)")
	flag.BoolVar(&o.Resume, "resume", false, "continue the run in -out from its last complete checkpoint")
	flag.BoolVar(&o.JSON, "json", false, "print one JSON object on the last line of stdout")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "train: unexpected argument %q (flags come as -name value)\n", flag.Arg(0))
		os.Exit(2)
	}
	o.output = os.Stdout
	res, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "train:", err)
		os.Exit(1)
	}
	if o.JSON {
		out, _ := json.Marshal(res)
		fmt.Println(string(out))
	}
}

// runState is what a checkpoint records beside the trainer's state, to resume and to check that
// the command line is the run's.
type runState struct {
	Run        string      `json:"run"` // the settings that must match, as a digest of runKey
	RunKey     runKey      `json:"run_key"`
	Position   int         `json:"position"`
	Evals      []evalPoint `json:"evals"`
	Before     float64     `json:"valid_loss_before"`
	Forgetting *float64    `json:"forgetting_before,omitempty"`
	Best       float64     `json:"best_valid_loss"`
	BestStep   int         `json:"best_step"`
	Stale      int         `json:"validations_without_improvement"`
	Stopped    bool        `json:"stopped_early"`
	Seconds    float64     `json:"seconds"` // of training so far, over every process of the run
}

// runKey is what a resumed run must share with the checkpoint.
type runKey struct {
	Model, Method, MethodConfig, TrainData, ValidData string
	Steps, Batch, Seq, Warmup, GradAccum              int
	LR                                                float64
	Seed                                              int64
	Pack                                              bool
}

// evalPoint is one validation, a line of log.jsonl.
type evalPoint struct {
	Step      int     `json:"step"`
	TrainLoss float64 `json:"train_loss"`
	ValidLoss float64 `json:"valid_loss"`
	Seconds   float64 `json:"seconds"`
	TokensPS  float64 `json:"train_tokens_per_second"`
}

func run(o options) (result, error) {
	start := time.Now()
	if err := o.check(); err != nil {
		return result{}, err
	}
	method, methodJSON, err := o.newMethod()
	if err != nil {
		return result{}, err
	}
	unlock, err := lockFolder(o.Out)
	if err != nil {
		return result{}, err
	}
	defer unlock()
	resumeDir, resumeStep, err := lastCheckpoint(o.Out)
	if err != nil {
		return result{}, err
	}
	switch {
	case resumeDir != "" && !o.Resume:
		return result{}, fmt.Errorf("-out %s already holds a run (%s): continue it with -resume, or give another -out", o.Out, filepath.Base(resumeDir))
	case resumeDir == "" && o.Resume:
		o.printf("no checkpoint in %s: starting a new run\n", o.Out)
	}

	b, err := backend.Get()
	if err != nil {
		return result{}, err
	}
	fsys, modelName := stories260k.FS(), stories260k.Name
	if o.Model != "" {
		fsys, modelName = os.DirFS(o.Model), o.Model
	}
	tokData, err := fs.ReadFile(fsys, "tokenizer.json")
	if err != nil {
		return result{}, fmt.Errorf("-model %s: %w", modelName, err)
	}
	tok, err := tokenizer.Parse(tokData)
	if err != nil {
		return result{}, fmt.Errorf("-model %s: %w", modelName, err)
	}
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, fsys)
	if err != nil {
		return result{}, fmt.Errorf("-model %s: %w", modelName, err)
	}
	peft.NameBaseModel(ctx, modelName)
	if virtual := o.virtualTokens(); virtual+o.Seq > cfg.MaxPositions {
		return result{}, fmt.Errorf("-virtual-tokens %d plus -seq %d is %d, more than the %d positions of -model %s: lower one of them",
			virtual, o.Seq, virtual+o.Seq, cfg.MaxPositions, modelName)
	}
	eos := tok.EOS()
	if len(cfg.EOSTokenIDs) > 0 {
		eos = cfg.EOSTokenIDs[0]
	}
	trainFile, validFile, err := o.readData()
	if err != nil {
		return result{}, err
	}
	tokOpts := data.Options{SeqLen: o.Seq, EOS: eos}
	if trainFile.Format == data.Chat {
		tmpl, err := chat.LoadFS(fsys)
		if err != nil {
			return result{}, fmt.Errorf("-data %s holds chat records, and -model %s: %w", o.Data, modelName, err)
		}
		tokOpts.Template, tokOpts.EOS = tmpl, -1 // the template writes the end of each turn
	}
	trainExamples, trainStats, err := data.Tokenize(trainFile, tok, tokOpts)
	if err != nil {
		return result{}, err
	}
	validExamples, validStats, err := data.Tokenize(validFile, tok, tokOpts)
	if err != nil {
		return result{}, err
	}
	o.printf("train: %s\nvalid: %s\n", trainStats, validStats)

	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, o.Seq))
	if err != nil {
		return result{}, err
	}
	if err := o.checkTargets(m.Layout()); err != nil {
		return result{}, err
	}
	report := m.Report()
	o.printf("%s\nmodel: %s, method %s: %s\n", backend.Description(), modelName, method.Name(), report)

	loader := &data.Loader{Examples: trainExamples, Batch: o.Batch, SeqLen: o.Seq, Shuffle: true, Seed: uint64(o.Seed), Pack: o.Pack}
	stream, err := data.NewStream("train", loader)
	if err != nil {
		return result{}, err
	}
	validLoader := &data.Loader{Examples: validExamples, Batch: o.Batch, SeqLen: o.Seq}
	if err := validLoader.Validate(); err != nil {
		return result{}, err
	}
	valid := peft.NewDataset("valid", validLoader.Pass(), false)
	var forgetting *peft.Dataset
	if o.Forgetting != "" {
		if forgetting, err = o.forgettingSet(tok, eos); err != nil {
			return result{}, err
		}
	}

	// The command prints a line per validation; on a terminal the trainer adds its progress bar.
	progress := peft.ProgressOff
	if o.output == os.Stdout && term.IsTerminal(int(os.Stdout.Fd())) {
		progress = peft.ProgressBar
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: o.Steps, LearningRate: o.LR, WarmupSteps: o.Warmup, Loss: peft.NextTokenLoss,
		GradAccum: o.GradAccum, Seed: o.Seed, Progress: progress,
	})
	if err != nil {
		return result{}, err
	}

	key := runKey{Model: m.BaseFingerprint(), Method: method.Name(), MethodConfig: string(methodJSON),
		TrainData: digest(trainFile), ValidData: digest(validFile),
		Steps: o.Steps, Batch: o.Batch, Seq: o.Seq, Warmup: o.Warmup, GradAccum: o.GradAccum, LR: o.LR, Seed: o.Seed, Pack: o.Pack}
	state := runState{Run: key.digest(), RunKey: key, Best: math.Inf(1)}
	res := result{Method: method.Name(), TrainableParams: report.Trainable, Out: o.Out}
	if resumeDir != "" {
		var saved runState
		if _, err := peft.ReadCheckpoint(resumeDir, &saved); err != nil {
			return result{}, err
		}
		if saved.Run != state.Run {
			return result{}, fmt.Errorf("%s was made by another run: %s", resumeDir, saved.RunKey.differences(key))
		}
		if forgetting != nil && saved.Forgetting == nil {
			return result{}, fmt.Errorf("-forgetting was not given when the run in %s started, so there is no loss before training to compare with: resume without it", o.Out)
		}
		if err := trainer.LoadCheckpoint(resumeDir, &saved); err != nil {
			return result{}, err
		}
		state = saved
		stream.Seek(state.Position)
		res.ResumedFrom = resumeStep
		o.printf("resumed from %s at step %d\n", resumeDir, resumeStep)
	} else {
		if state.Before, err = evaluate(trainer, valid); err != nil {
			return result{}, err
		}
		if forgetting != nil {
			f, err := evaluate(trainer, forgetting)
			if err != nil {
				return result{}, err
			}
			state.Forgetting = &f
		}
		o.printf("validation loss before training: %.4f\n", state.Before)
	}

	elapsedBefore := state.Seconds // of the processes before this one
	tokensPerStep := float64(o.Batch * o.Seq * o.GradAccum)
	for trainer.Step() < o.Steps && !state.Stopped {
		from := trainer.Step()
		step := min(o.Steps, nextMultiple(from, o.EvalEvery), nextMultiple(from, o.SaveEvery))
		t0 := time.Now()
		if _, err := trainer.TrainSteps(stream, step-from); err != nil {
			return result{}, err
		}
		perStep := time.Since(t0).Seconds() / float64(step-from)
		state.Position = stream.Position()
		state.Seconds = elapsedBefore + time.Since(start).Seconds()
		if step%o.EvalEvery == 0 || step == o.Steps {
			loss, err := evaluate(trainer, valid)
			if err != nil {
				return result{}, err
			}
			since := 0
			if len(state.Evals) > 0 {
				since = state.Evals[len(state.Evals)-1].Step
			}
			point := evalPoint{Step: step, TrainLoss: meanOf(trainer.Losses()[since:]), ValidLoss: loss,
				Seconds: state.Seconds, TokensPS: tokensPerStep / perStep}
			state.Evals = append(state.Evals, point)
			eta := time.Duration(float64(o.Steps-step) * perStep * float64(time.Second))
			o.printf("step %d/%d  train loss %.4f  valid loss %.4f  %.0f tokens/s  ETA %s\n",
				step, o.Steps, point.TrainLoss, loss, point.TokensPS, eta.Round(time.Second))
			if loss < state.Best-o.PatienceThreshold {
				state.Best, state.BestStep, state.Stale = loss, step, 0
				if err := m.Save(filepath.Join(o.Out, "best")); err != nil {
					return result{}, err
				}
			} else if state.Stale++; o.Patience > 0 && state.Stale >= o.Patience {
				state.Stopped = true
				o.printf("stopping early: %d validation(s) without improvement (best %.4f at step %d)\n", state.Stale, state.Best, state.BestStep)
			}
			if err := writeLog(o.Out, state.Evals); err != nil {
				return result{}, err
			}
		}
		if step%o.SaveEvery == 0 || step == o.Steps || state.Stopped {
			if err := trainer.SaveCheckpoint(filepath.Join(o.Out, fmt.Sprintf("checkpoint-%d", step)), state); err != nil {
				return result{}, err
			}
			if err := pruneCheckpoints(o.Out, o.KeepCheckpoints); err != nil {
				return result{}, err
			}
		}
	}

	if err := o.writeResult(m, fsys, state); err != nil {
		return result{}, err
	}
	losses := trainer.Losses()
	chart := plot.Chart{Title: fmt.Sprintf("%s on %s", method.Name(), filepath.Base(o.Data)), XLabel: "step", YLabel: "loss",
		Series: []plot.Series{{Name: "train", Values: losses}}, Smooth: max(1, len(losses)/50)}
	if err := chart.WritePNG(filepath.Join(o.Out, "loss.png")); err != nil {
		return result{}, err
	}
	res.Steps = trainer.Step()
	res.TrainLossFirst, res.TrainLossLast = losses[0], losses[len(losses)-1]
	res.ValidLossBefore, res.ValidLossAfter = state.Before, state.Evals[len(state.Evals)-1].ValidLoss
	res.BestValidLoss, res.BestStep, res.StoppedEarly = state.Best, state.BestStep, state.Stopped
	if forgetting != nil {
		after, err := evaluate(trainer, forgetting)
		if err != nil {
			return result{}, err
		}
		res.ForgettingBefore, res.ForgettingAfter = state.Forgetting, &after
		o.printf("loss on %s (general text): %.4f before, %.4f after\n", o.Forgetting, *state.Forgetting, after)
	}
	res.Seconds = elapsedBefore + time.Since(start).Seconds()
	o.printf("validation loss %.4f → %.4f (best %.4f at step %d); written to %s\n", res.ValidLossBefore, res.ValidLossAfter, res.BestValidLoss, res.BestStep, o.Out)
	if state.Stopped {
		o.printf("the run stopped early: %s holds the best adapter (step %d), as does %s\n", o.Out, state.BestStep, filepath.Join(o.Out, "best"))
	} else if state.BestStep != res.Steps {
		o.printf("the best validation loss was at step %d: %s holds that adapter\n", state.BestStep, filepath.Join(o.Out, "best"))
	}
	return res, nil
}

// writeResult writes the run's result into -out: the adapter (the best one when the run stopped
// early), and the model's tokenizer files, so that the folder works with examples/generate and a
// full fine-tune's folder is a complete model.
func (o *options) writeResult(m *peft.Model, model fs.FS, state runState) error {
	if state.Stopped {
		best, err := os.ReadDir(filepath.Join(o.Out, "best"))
		if err != nil {
			return err
		}
		var files []atomicfile.File
		for _, e := range best {
			if e.Type().IsRegular() && !strings.HasPrefix(e.Name(), ".") {
				data, err := os.ReadFile(filepath.Join(o.Out, "best", e.Name()))
				if err != nil {
					return err
				}
				files = append(files, atomicfile.File{Name: e.Name(), Data: data})
			}
		}
		if err := atomicfile.WriteFiles(o.Out, files); err != nil {
			return err
		}
	} else if err := m.Save(o.Out); err != nil {
		return err
	}
	var present []string
	for _, name := range []string{"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"} {
		if _, err := fs.Stat(model, name); err == nil {
			present = append(present, name)
		}
	}
	files, err := atomicfile.ReadFiles(model, present...)
	if err != nil {
		return err
	}
	return atomicfile.WriteFiles(o.Out, files)
}

// checkTargets requires every name of -targets to name a linear layer of the model: a misspelt
// name would otherwise adapt fewer layers without a word.
func (o *options) checkTargets(layout *peft.Layout) error {
	if o.Targets == "" || o.Targets == peft.AllLinear || !slices.Contains([]string{"lora", "qlora", "adalora"}, o.Method) {
		return nil
	}
	names := map[string]bool{}
	for _, l := range layout.Linears {
		names[l.Path[strings.LastIndex(l.Path, ".")+1:]] = true
	}
	for _, target := range strings.Split(o.Targets, ",") {
		if !names[strings.TrimSpace(target)] {
			known := slices.Sorted(maps.Keys(names))
			return fmt.Errorf("-targets: the model has no linear layer named %q (it has %s)", strings.TrimSpace(target), strings.Join(known, ", "))
		}
	}
	return nil
}

// pruneCheckpoints keeps the keep newest checkpoint-N folders of dir (0 keeps all).
func pruneCheckpoints(dir string, keep int) error {
	if keep <= 0 {
		return nil
	}
	steps, err := checkpointSteps(dir)
	if err != nil {
		return err
	}
	for len(steps) > keep {
		if err := os.RemoveAll(filepath.Join(dir, fmt.Sprintf("checkpoint-%d", steps[0]))); err != nil {
			return err
		}
		steps = steps[1:]
	}
	return nil
}

func meanOf(values []float64) float64 {
	if len(values) == 0 {
		return math.NaN()
	}
	sum := 0.0
	for _, v := range values {
		sum += v
	}
	return sum / float64(len(values))
}

// check validates the options and fills in the defaults that depend on others.
func (o *options) check() error {
	o.Method = strings.ReplaceAll(o.Method, "_", "-") // the saved names (prompt_tuning) work too
	switch {
	case o.Data == "":
		return errors.New("-data is required: a folder with train.jsonl and valid.jsonl, or a .jsonl file")
	case o.Out == "":
		return errors.New("-out is required: the folder for the adapter and checkpoints")
	case o.Steps <= 0 || o.Batch <= 0 || o.Seq < 2 || o.GradAccum <= 0:
		return fmt.Errorf("-steps (%d), -batch (%d) and -grad-accum (%d) must be > 0 and -seq (%d) ≥ 2", o.Steps, o.Batch, o.GradAccum, o.Seq)
	case !(o.ValidShare > 0 && o.ValidShare < 1):
		return fmt.Errorf("-valid-share must be in (0, 1), got %g", o.ValidShare)
	case o.EvalEvery < 0 || o.SaveEvery < 0 || o.Patience < 0 || o.KeepCheckpoints < 0:
		return errors.New("-eval-every, -save-every, -patience and -keep-checkpoints must be ≥ 0")
	case !(o.PatienceThreshold >= 0) || math.IsInf(o.PatienceThreshold, 0):
		return fmt.Errorf("-patience-threshold must be a number ≥ 0, got %g", o.PatienceThreshold)
	case o.LR < 0 || math.IsNaN(o.LR) || math.IsInf(o.LR, 0):
		return fmt.Errorf("-lr must be > 0, got %g", o.LR)
	case o.virtualTokens() < 0 || o.virtualTokens() == 0 && (o.Method == "prompt-tuning" || o.Method == "prefix-tuning"):
		return fmt.Errorf("-virtual-tokens must be > 0, got %d", o.VirtualTokens)
	}
	if st, err := os.Stat(o.Out); err == nil && !st.IsDir() {
		return fmt.Errorf("-out %s is a file, not a folder", o.Out)
	}
	if o.Forgetting != "" {
		if _, err := os.Stat(o.Forgetting); err != nil {
			return fmt.Errorf("-forgetting: %w", err)
		}
	}
	if o.Warmup < 0 {
		o.Warmup = o.Steps / 10
	}
	if o.EvalEvery == 0 {
		o.EvalEvery = max(1, o.Steps/10)
	}
	if o.SaveEvery == 0 {
		o.SaveEvery = o.EvalEvery
	}
	if o.LR == 0 {
		o.LR = map[string]float64{"lora": 2e-4, "qlora": 2e-4, "adalora": 2e-4, "ia3": 3e-3, "adapter": 1e-3, "prompt-tuning": 3e-2,
			"prefix-tuning": 1e-2, "full": 2e-5}[o.Method]
	}
	return nil
}

// virtualTokens is the number of positions -method adds to every sequence: -virtual-tokens for
// prompt and prefix tuning, 0 for the others.
func (o *options) virtualTokens() int {
	if o.Method == "prompt-tuning" || o.Method == "prefix-tuning" {
		return o.VirtualTokens
	}
	return 0
}

// newMethod builds the method named by -method from the packages' defaults and the method flags,
// and returns its configuration as JSON (part of what a resumed run must share).
func (o *options) newMethod() (peft.Method, []byte, error) {
	targets := peft.TargetNames("q_proj", "v_proj")
	if o.Targets == peft.AllLinear {
		targets = peft.TargetPattern(peft.AllLinear)
	} else if o.Targets != "" {
		var names []string
		for _, n := range strings.Split(o.Targets, ",") {
			names = append(names, strings.TrimSpace(n))
		}
		targets = peft.TargetNames(names...)
	}
	alpha := o.Alpha
	if alpha == 0 {
		alpha = float64(o.Rank)
	}
	loraCfg := lora.DefaultConfig()
	loraCfg.Rank, loraCfg.Alpha, loraCfg.Dropout, loraCfg.TargetModules, loraCfg.Seed = o.Rank, alpha, o.Dropout, targets, uint64(o.Seed)
	loraCfg.UseDoRA = o.DoRA
	if o.DoRA && o.Method != "lora" && o.Method != "qlora" {
		return nil, nil, fmt.Errorf("-dora applies to -method lora or qlora, not %q", o.Method)
	}
	var config any
	var method peft.Method
	var err error
	switch o.Method {
	case "lora":
		config = loraCfg
		method, err = lora.New(loraCfg)
	case "qlora":
		c := qlora.FromLoRA(loraCfg)
		config = c
		method, err = qlora.New(c)
	case "adalora":
		c := adalora.DefaultConfig()
		c.TargetRank, c.InitRank = o.Rank, o.Rank*3/2
		c.Alpha, c.Dropout, c.TargetModules, c.Seed = alpha, o.Dropout, targets, uint64(o.Seed)
		c.TotalSteps, c.TInit, c.TFinal = o.Steps, o.Steps/10, o.Steps/5
		config = c
		method, err = adalora.New(c)
	case "ia3":
		c := ia3.DefaultConfig()
		if o.Targets != "" { // by default IA3 scales k, v and down_proj's input
			c.TargetModules, c.FeedforwardModules = targets, peft.Targets{}
			if targets.Matches(&peft.LinearLayer{Path: "model.layers.0.mlp.down_proj"}) {
				c.FeedforwardModules = peft.TargetNames("down_proj") // scaled on its input, as PEFT does
			}
		}
		config = c
		method, err = ia3.New(c)
	case "adapter":
		c := adapter.Pfeiffer()
		c.Seed = uint64(o.Seed)
		config = c
		method, err = adapter.New(c)
	case "prompt-tuning":
		c := prompttuning.DefaultConfig()
		c.NumVirtualTokens, c.Seed = o.VirtualTokens, uint64(o.Seed)
		config = c
		method, err = prompttuning.New(c)
	case "prefix-tuning":
		c := prefixtuning.DefaultConfig()
		c.NumVirtualTokens, c.PrefixProjection, c.Seed = o.VirtualTokens, o.PrefixProjection, uint64(o.Seed)
		config = c
		method, err = prefixtuning.New(c)
	case "full":
		c := full.DefaultConfig()
		config = c
		method, err = full.New(c)
	default:
		return nil, nil, fmt.Errorf("-method %q: want lora, qlora, adalora, ia3, adapter, prompt-tuning, prefix-tuning or full", o.Method)
	}
	if err != nil {
		return nil, nil, err
	}
	raw, err := json.Marshal(config)
	return method, raw, err
}

// readData reads -data: a folder's train.jsonl and valid.jsonl, or one file whose last
// -valid-share of records is held out.
func (o *options) readData() (train, valid *data.File, err error) {
	st, err := os.Stat(o.Data)
	if err != nil {
		return nil, nil, fmt.Errorf("-data: %w", err)
	}
	if st.IsDir() {
		for _, name := range []string{"train.jsonl", "valid.jsonl"} {
			if _, err := os.Stat(filepath.Join(o.Data, name)); err != nil {
				return nil, nil, fmt.Errorf("-data %s has no %s: a folder needs train.jsonl and valid.jsonl; or give one .jsonl file, of which -valid-share is held out", o.Data, name)
			}
		}
		if train, err = data.ReadJSONL(filepath.Join(o.Data, "train.jsonl")); err != nil {
			return nil, nil, err
		}
		valid, err = data.ReadJSONL(filepath.Join(o.Data, "valid.jsonl"))
		return train, valid, err
	}
	all, err := data.ReadJSONL(o.Data)
	if err != nil {
		return nil, nil, err
	}
	n := len(all.Records)
	held := int(math.Round(float64(n) * o.ValidShare))
	if held < 1 || held >= n {
		return nil, nil, fmt.Errorf("%s has %d records: -valid-share %g holds out %d of them; give a valid.jsonl instead", o.Data, n, o.ValidShare, held)
	}
	train = &data.File{Name: all.Name, Format: all.Format, Records: all.Records[:n-held]}
	valid = &data.File{Name: all.Name, Format: all.Format, Records: all.Records[n-held:]}
	return train, valid, nil
}

// forgettingSet reads -forgetting, general text whose loss tells what the fine-tune cost.
func (o *options) forgettingSet(tok *tokenizer.Tokenizer, eos int) (*peft.Dataset, error) {
	f, err := data.ReadJSONL(o.Forgetting)
	if err != nil {
		return nil, fmt.Errorf("-forgetting: %w", err)
	}
	examples, _, err := data.Tokenize(f, tok, data.Options{SeqLen: o.Seq, EOS: eos})
	if err != nil {
		return nil, err
	}
	l := &data.Loader{Examples: examples, Batch: o.Batch, SeqLen: o.Seq}
	if err := l.Validate(); err != nil {
		return nil, err
	}
	return peft.NewDataset("forgetting", l.Pass(), false), nil
}

func (o *options) printf(format string, args ...any) {
	if o.output != nil {
		fmt.Fprintf(o.output, format, args...)
	}
}

func evaluate(t *peft.Trainer, ds *peft.Dataset) (float64, error) {
	r, err := t.Evaluate(ds)
	return r.Loss, err
}

// nextMultiple is the least multiple of every after step.
func nextMultiple(step, every int) int { return (step/every + 1) * every }

// digest is a hash of a data file's records.
func digest(f *data.File) string {
	h := sha256.New()
	enc := json.NewEncoder(h)
	for _, r := range f.Records {
		_ = enc.Encode(r)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func (k runKey) digest() string {
	raw, _ := json.Marshal(k)
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:])
}

// differences names the settings where k and other differ, as command-line terms.
func (k runKey) differences(other runKey) string {
	var out []string
	add := func(what string, a, b any) {
		if a != b {
			out = append(out, fmt.Sprintf("%s %v, this command %v", what, a, b))
		}
	}
	if k.Model != other.Model {
		out = append(out, "another base model (-model)")
	}
	add("-method", k.Method, other.Method)
	if k.Method == other.Method && k.MethodConfig != other.MethodConfig {
		out = append(out, methodOptionDifferences(k.MethodConfig, other.MethodConfig)...)
	}
	if k.TrainData != other.TrainData || k.ValidData != other.ValidData {
		out = append(out, "other data (-data)")
	}
	add("-steps", k.Steps, other.Steps)
	add("-batch", k.Batch, other.Batch)
	add("-seq", k.Seq, other.Seq)
	add("-warmup (a tenth of -steps unless given)", k.Warmup, other.Warmup)
	add("-grad-accum", k.GradAccum, other.GradAccum)
	add("-lr", k.LR, other.LR)
	add("-seed", k.Seed, other.Seed)
	add("-pack", k.Pack, other.Pack)
	if len(out) == 0 {
		return "the settings differ"
	}
	return "it has " + strings.Join(out, "; ")
}

// optionFlags names the flag behind each field of the methods' configurations that a flag sets.
var optionFlags = map[string]string{
	"r": "-rank", "init_r": "-rank", "target_r": "-rank", "lora_alpha": "-alpha", "lora_dropout": "-dropout",
	"use_dora": "-dora", "target_modules": "-targets", "feedforward_modules": "-targets",
	"num_virtual_tokens": "-virtual-tokens", "prefix_projection": "-prefix-projection", "seed": "-seed",
}

// methodOptionDifferences names the fields where two method configurations (JSON objects)
// differ, by their flag where one sets them.
func methodOptionDifferences(a, b string) []string {
	var ma, mb map[string]json.RawMessage
	if json.Unmarshal([]byte(a), &ma) != nil || json.Unmarshal([]byte(b), &mb) != nil {
		return []string{fmt.Sprintf("method options %s, this command %s", a, b)}
	}
	keys := map[string]bool{}
	for key := range ma {
		keys[key] = true
	}
	for key := range mb {
		keys[key] = true
	}
	value := func(raw json.RawMessage, ok bool) string {
		if !ok {
			return "the default"
		}
		return string(raw)
	}
	var out []string
	for _, key := range slices.Sorted(maps.Keys(keys)) {
		va, okA := ma[key]
		vb, okB := mb[key]
		if okA == okB && string(va) == string(vb) {
			continue
		}
		name := key
		if flag, found := optionFlags[key]; found {
			name = flag + " (" + key + ")"
		}
		out = append(out, fmt.Sprintf("%s %s, this command %s", name, value(va, okA), value(vb, okB)))
	}
	return out
}

// checkpointSteps lists the steps of dir's complete checkpoint-N folders, in order, after
// putting back any that a kill left half replaced.
func checkpointSteps(dir string) ([]int, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if name, ok := strings.CutPrefix(e.Name(), ".checkpoint-"); ok && e.IsDir() {
			if i := strings.Index(name, "."); i > 0 {
				if err := atomicfile.RecoverDir(filepath.Join(dir, "checkpoint-"+name[:i])); err != nil {
					return nil, err
				}
			}
		}
	}
	if entries, err = os.ReadDir(dir); err != nil {
		return nil, err
	}
	var steps []int
	for _, e := range entries {
		n, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "checkpoint-"))
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "checkpoint-") || err != nil || n <= 0 {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, e.Name(), peft.TrainerStateFile)); err == nil {
			steps = append(steps, n)
		}
	}
	sort.Ints(steps)
	return steps, nil
}

// lastCheckpoint finds the highest-numbered complete checkpoint-N in dir ("" if none).
func lastCheckpoint(dir string) (string, int, error) {
	steps, err := checkpointSteps(dir)
	if err != nil || len(steps) == 0 {
		return "", 0, err
	}
	last := steps[len(steps)-1]
	return filepath.Join(dir, fmt.Sprintf("checkpoint-%d", last)), last, nil
}

// writeLog writes the validations so far to DIR/log.jsonl, one JSON object a line (rewritten
// whole, so that a resumed run's log is the checkpoint's).
func writeLog(dir string, points []evalPoint) error {
	var buf []byte
	for _, p := range points {
		line, err := json.Marshal(p)
		if err != nil {
			return err
		}
		buf = append(append(buf, line...), '\n')
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, "log.jsonl"), buf)
}
