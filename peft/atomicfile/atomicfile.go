// Package atomicfile writes files so that a reader sees the old content or the new, never a
// partial file: Write replaces one file (a temporary in the same folder, synced, renamed into
// place), WriteFiles several files of a folder as one change (pending files, then a journal
// that commits them), WriteDir a whole folder. Every save in the SDK goes through it, so a crash
// mid-save loses nothing.
package atomicfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Write replaces path with data atomically. The file gets mode 0644 (os.CreateTemp would leave
// 0600). On error nothing is left behind and an existing file is untouched.
func Write(path string, data []byte) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmpName)
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", tmpName, err)
	}
	if err = tmp.Chmod(0o644); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", tmpName, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmpName, err)
	}
	if err = os.Rename(tmpName, path); err != nil {
		return err
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync() // best effort: makes the rename durable
		d.Close()
	}
	return nil
}

// WriteDir replaces the folder dir with one that fill writes: fill gets a new folder beside dir
// and writes every file into it; only when it returns without error is the folder renamed to
// dir (an existing dir is moved aside first and then removed). A crash or error while filling
// leaves dir as it was, and at worst a hidden ".<name>.tmp-*" folder beside it.
func WriteDir(dir string, fill func(tmp string) error) (err error) {
	parent, base := filepath.Split(filepath.Clean(dir))
	if parent == "" {
		parent = "."
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	if err := recoverDir(parent, base); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(parent, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err = os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err = fill(tmp); err != nil {
		return err
	}
	syncDir(tmp)
	if err = Write(filepath.Join(tmp, completeMarker), nil); err != nil {
		return err
	}
	var old string
	if _, statErr := os.Stat(dir); statErr == nil {
		old = filepath.Join(parent, "."+base+".old-"+filepath.Base(tmp)[len(base)+6:])
		if err = os.Rename(dir, old); err != nil {
			return err
		}
	}
	if err = os.Rename(tmp, dir); err != nil {
		if old != "" {
			_ = os.Rename(old, dir)
		}
		return err
	}
	_ = os.Remove(filepath.Join(dir, completeMarker))
	if old != "" {
		_ = os.RemoveAll(old)
	}
	if d, derr := os.Open(parent); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// completeMarker marks a WriteDir's new folder as filled and synced: from then on it, not the
// old one, is the folder's content.
const completeMarker = ".peft-complete"

// RecoverDir undoes what a WriteDir of dir killed midway left: if dir is missing, the new folder
// is moved into place when it was complete, else the previous one moved aside is moved back; the
// hidden new and old folders of crashed saves are then removed. Loaders of checkpoints call it
// first; WriteDir does.
func RecoverDir(dir string) error {
	parent, base := filepath.Split(filepath.Clean(dir))
	if parent == "" {
		parent = "."
	}
	return recoverDir(parent, base)
}

func recoverDir(parent, base string) error {
	entries, err := os.ReadDir(parent)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var olds, tmps []string
	for _, e := range entries { // by prefix: a name may hold glob characters
		switch name := e.Name(); {
		case strings.HasPrefix(name, "."+base+".old-"):
			olds = append(olds, filepath.Join(parent, name))
		case strings.HasPrefix(name, "."+base+".tmp-"):
			tmps = append(tmps, filepath.Join(parent, name))
		}
	}
	target := filepath.Join(parent, base)
	if _, err := os.Stat(target); errors.Is(err, os.ErrNotExist) {
		for i, tmp := range tmps {
			if _, err := os.Stat(filepath.Join(tmp, completeMarker)); err == nil {
				if err := os.Rename(tmp, target); err != nil {
					return err
				}
				tmps = append(tmps[:i], tmps[i+1:]...)
				_ = os.Remove(filepath.Join(target, completeMarker))
				break
			}
		}
	}
	if _, err := os.Stat(target); errors.Is(err, os.ErrNotExist) && len(olds) > 0 {
		if err := os.Rename(olds[len(olds)-1], target); err != nil {
			return err
		}
		olds = olds[:len(olds)-1]
	}
	for _, leftover := range append(olds, tmps...) {
		if err := os.RemoveAll(leftover); err != nil {
			return err
		}
	}
	return nil
}

// File is one file of a save that writes several (WriteFiles).
type File struct {
	Name string // the file's name in the folder (no path separators)
	Data []byte
}

// ReadFiles reads the named files of from (none when from is nil) for a WriteFiles that copies
// them beside a save (tokenizer files beside a model).
func ReadFiles(from fs.FS, names ...string) ([]File, error) {
	if from == nil {
		return nil, nil
	}
	files := make([]File, 0, len(names))
	for _, name := range names {
		data, err := fs.ReadFile(from, name)
		if err != nil {
			return nil, err
		}
		files = append(files, File{Name: name, Data: data})
	}
	return files, nil
}

// journalName is the file that commits a WriteFiles: it lists the pending files that replace
// the folder's files and the files it removes.
const journalName = ".peft-save-journal"

// journal is journalName's content.
type journal struct {
	Files  []pendingFile `json:"files"`
	Remove []string      `json:"remove,omitempty"`
}

type pendingFile struct {
	Name    string `json:"name"`
	Pending string `json:"pending"`
}

// WriteFiles replaces files in dir and removes the files named in remove, as one change that a
// kill at any instant cannot leave half done: each new file is first written beside its
// destination under a hidden pending name and synced; a journal listing them is then written
// atomically (the commit point); only then are the removals done, the pending files renamed into
// place, and the journal deleted. A save killed before the commit leaves the folder as
// it was; one killed after it is completed by the next WriteFiles or Finish (which every
// loader of the SDK calls first), so either way the folder reads as the old save or the new,
// never a mix. WriteFiles also deletes what crashed saves left behind (pending files of an
// uncommitted save, temporaries of Write). One writer per folder at a time.
func WriteFiles(dir string, files []File, remove ...string) (err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := Finish(dir); err != nil {
		return err
	}
	if err := removeLeftovers(dir); err != nil {
		return err
	}
	if len(files) == 0 { // removals alone need no journal
		for _, name := range remove {
			if !plainName(name) {
				return fmt.Errorf("atomicfile.WriteFiles: %q is not a plain file name", name)
			}
			if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		return nil
	}
	var j journal
	defer func() {
		if err != nil {
			for _, p := range j.Files {
				os.Remove(filepath.Join(dir, p.Pending))
			}
		}
	}()
	for _, name := range remove {
		if !plainName(name) {
			return fmt.Errorf("atomicfile.WriteFiles: %q is not a plain file name", name)
		}
	}
	for _, f := range files {
		if !plainName(f.Name) {
			return fmt.Errorf("atomicfile.WriteFiles: %q is not a plain file name", f.Name)
		}
		tmp, err := os.CreateTemp(dir, "."+f.Name+".pending-*")
		if err != nil {
			return err
		}
		j.Files = append(j.Files, pendingFile{Name: f.Name, Pending: filepath.Base(tmp.Name())})
		err = writeSynced(tmp, f.Data)
		if err != nil {
			return err
		}
	}
	j.Remove = remove
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	crashPoint("before commit")
	if err := Write(filepath.Join(dir, journalName), data); err != nil {
		return err
	}
	crashPoint("after commit")
	return Finish(dir)
}

// crashPoint lets tests stop a save at a given point, as a kill would (it panics there).
var crashPoint = func(string) {}

// writeSynced writes data to f, syncs and closes it, with mode 0644.
func writeSynced(f *os.File, data []byte) error {
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing %s: %w", f.Name(), err)
	}
	return f.Close()
}

// plainName reports whether name is a file name of the folder itself, not hidden.
func plainName(name string) bool {
	return name != "" && name == filepath.Base(name) && !strings.HasPrefix(name, ".") && !strings.ContainsAny(name, `/\`)
}

// readJournal reads dir's journal: nil when there is none, an error when it is not one this
// package wrote (names outside the folder, pending files not named as WriteFiles names them).
func readJournal(dir string) (*journal, error) {
	data, err := os.ReadFile(filepath.Join(dir, journalName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var j journal
	if err := json.Unmarshal(data, &j); err != nil {
		return nil, fmt.Errorf("atomicfile: %s's save journal is damaged: %w", dir, err)
	}
	if len(j.Files) == 0 {
		return nil, fmt.Errorf("atomicfile: %s's save journal lists no file", dir)
	}
	for _, p := range j.Files {
		if !plainName(p.Name) || p.Pending != filepath.Base(p.Pending) || !strings.HasPrefix(p.Pending, "."+p.Name+".pending-") {
			return nil, fmt.Errorf("atomicfile: %s's save journal names a file this package does not write (%q, %q)", dir, p.Name, p.Pending)
		}
	}
	for _, name := range j.Remove {
		if !plainName(name) {
			return nil, fmt.Errorf("atomicfile: %s's save journal names a file this package does not write (%q)", dir, name)
		}
	}
	return &j, nil
}

// renamePending moves a committed save's pending files into place. A file whose pending name is
// gone was moved already; one with neither its pending file nor itself is an error.
func renamePending(dir string, j *journal) error {
	for _, p := range j.Files {
		err := os.Rename(filepath.Join(dir, p.Pending), filepath.Join(dir, p.Name))
		if errors.Is(err, os.ErrNotExist) {
			if _, statErr := os.Stat(filepath.Join(dir, p.Name)); statErr != nil {
				return fmt.Errorf("atomicfile: the save committed in %s lists %s, but neither it nor its pending file is there", dir, p.Name)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("atomicfile: completing the save in %s: %w", dir, err)
		}
		crashPoint("after renaming " + p.Name)
	}
	return nil
}

// Finish completes a WriteFiles that was committed in dir but cut short: it does the removals,
// renames the pending files that remain into place and deletes the journal. Without a journal it
// does nothing. A journal this package did not write (damaged, or naming other files) is
// discarded, the folder left as it is. Writers call it; loaders call Complete.
func Finish(dir string) error {
	j, err := readJournal(dir)
	if err != nil {
		if rmErr := os.Remove(filepath.Join(dir, journalName)); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			return fmt.Errorf("%w (and it cannot be removed: %v)", err, rmErr)
		}
		return nil
	}
	if j == nil {
		return nil
	}
	// Removals come first, and only for a save under way: one of its pending files is still
	// there. Once every pending file is in place the removals were done; a journal without
	// pending files that is not ours removes nothing on its word.
	underWay := false
	for _, p := range j.Files {
		if _, err := os.Lstat(filepath.Join(dir, p.Pending)); err == nil {
			underWay = true
		}
	}
	for _, name := range j.Remove {
		if !underWay {
			break
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("atomicfile: completing the save in %s: %w", dir, err)
		}
	}
	if err := renamePending(dir, j); err != nil {
		return err
	}
	syncDir(dir)
	if err := os.Remove(filepath.Join(dir, journalName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	syncDir(dir)
	return nil
}

// Complete is what a loader runs before reading dir: it moves a committed save's pending files
// into place, as Finish does, but removes nothing and keeps the journal (the next save finishes
// it), and ignores a journal this package did not write. A folder without one is untouched.
func Complete(dir string) error {
	j, err := readJournal(dir)
	if err != nil || j == nil {
		return err
	}
	return renamePending(dir, j)
}

// removeLeftovers deletes the pending files of uncommitted saves and the temporaries of
// interrupted Writes in dir (hidden files named by this package's patterns).
func removeLeftovers(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasPrefix(name, ".") || !(strings.Contains(name, ".pending-") || strings.Contains(name, ".tmp-")) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// syncDir makes renames in dir durable (best effort).
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}
